//! `constellationd run`: validate, bind, spawn, wait, shut down.
//!
//! Order matters: configuration (flags, environment, `--config` file) is
//! checked before anything binds; then the TCP listener, the multicast
//! sockets and the control socket are bound; only then are the sibling
//! tasks spawned, and systemd is told `READY=1`. One root token stops
//! everything: SIGTERM, SIGINT, SIGQUIT, `POST /v1/leave`, or any essential
//! task ending. SIGHUP re-reads the `--config` file (see [`Reloader`]);
//! without one it is logged and ignored.
//!
//! Exit status, one rule: **2** when the configuration cannot work on this
//! host, found before anything binds where it can be (a bad flag or file
//! value, a missing interface, an unreadable secret file, a `--listen`
//! address this host does not have or this user may not bind); **1** when a
//! runtime condition stops the node and may pass (the `--listen` port in
//! use, another daemon on the control socket, a multicast join failing).

use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use dashmap::DashMap;
use discovery::sources::Limits;
use proto::frame::VERSION;
use proto::membership::{Config as TableConfig, PeerTable};
use proto::secure::{Keyring, SharedKeyring};
use proto::{tags_digest, Hello, NodeId, Tags};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::beaconwatch::{self, BeaconWatch, Finding};
use crate::config::RunArgs;
use crate::configfile::{self, Source};
use crate::logging::LogControl;
use crate::state::{EventBus, NodeState};
use crate::{api, netif, notify, secret, socket, table_task};

/// How long tasks get to finish after shutdown starts.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Everything `run` needs, checked.
struct Plan {
    args: RunArgs,
    name: String,
    interfaces: Vec<discovery::Interface>,
    /// Every address of the chosen interfaces (both families), with its
    /// prefix: the subnets of the address rule.
    prefixes: Vec<(IpAddr, u8)>,
    socket: PathBuf,
    tags: Tags,
    keyring: Option<Keyring>,
}

fn plan(args: RunArgs) -> Result<Plan, String> {
    let name = match &args.name {
        Some(n) => n.clone(),
        None => {
            let host = gethostname::gethostname().to_string_lossy().into_owned();
            let clean: String = host
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                        c
                    } else {
                        '-'
                    }
                })
                .take(64)
                .collect();
            if clean.is_empty() {
                "node".to_string()
            } else {
                clean
            }
        }
    };
    let netif::Resolved {
        interfaces,
        prefixes,
        missing,
    } = netif::resolve(&args.interface, args.group.is_ipv6())
        .map_err(|e| format!("--interface: {e}"))?;
    for m in &missing {
        warn!("--interface: {m}; skipping it");
    }
    if interfaces.is_empty() {
        let why: Vec<String> = missing.iter().map(|m| m.to_string()).collect();
        return Err(format!(
            "--interface: no usable interface ({})",
            why.join("; ")
        ));
    }
    let socket = socket::resolve(args.sock.socket.as_deref());
    socket::check_len(&socket).map_err(|e| format!("--socket: {e}"))?;
    if args.socket_mode & 0o007 != 0 {
        warn!(
            socket_mode = format!("{:04o}", args.socket_mode),
            "--socket-mode lets every local user use the control socket (send messages, stop the node, change keys); use 0660 and a group instead"
        );
    }
    if let Some(crate::config::Advertise::Ip(ip, _)) = args.advertise {
        if ip.is_loopback() && interfaces.iter().any(|i| !i.addr.is_loopback()) {
            warn!(advertise = %ip, "advertising a loopback address on a non-loopback interface: peers on other hosts cannot dial it");
        }
    }
    if args.suspect_after >= args.dead_after {
        return Err(format!(
            "--suspect-after ({:?}) must be shorter than --dead-after ({:?})",
            args.suspect_after, args.dead_after
        ));
    }
    let tags: Tags = args.tag.iter().cloned().collect();
    let keyring = match &args.secret_file {
        Some(path) => Some(secret::load(path).map_err(|e| format!("--secret-file: {e}"))?),
        None => None,
    };
    Ok(Plan {
        args,
        name,
        interfaces,
        prefixes,
        socket,
        tags,
        keyring,
    })
}

/// Why the node did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A flag's value cannot be used (exit 2).
    #[error("{0}")]
    Config(String),
    /// Binding or starting failed (exit 1).
    #[error("{0:#}")]
    Start(#[from] anyhow::Error),
}

impl StartError {
    /// The exit status for this failure (see the module docs).
    pub fn exit_code(&self) -> ExitCode {
        match self {
            StartError::Config(_) => ExitCode::from(2),
            StartError::Start(_) => ExitCode::from(1),
        }
    }
}

/// A started node.
#[derive(Debug)]
pub struct Running {
    /// Shared state (read-model, counters).
    pub state: Arc<NodeState>,
    /// Cancelling this stops the node gracefully.
    pub cancel: CancellationToken,
    /// Changes the event handlers while the node runs.
    pub handlers: crate::handlers::Control,
    tracker: TaskTracker,
    socket: PathBuf,
}

impl Running {
    /// Waits for a stop request (`cancel`), then shuts down gracefully:
    /// leave beacons, goodbyes, socket removed.
    pub async fn wait(self) {
        self.cancel.cancelled().await;
        if tokio::time::timeout(SHUTDOWN_GRACE, self.tracker.wait())
            .await
            .is_err()
        {
            warn!(
                remaining = self.tracker.len(),
                "tasks still running after the grace period"
            );
        }
        if let Err(error) = std::fs::remove_file(&self.socket) {
            warn!(%error, socket = %self.socket.display(), "cannot remove the control socket");
        }
        info!("node stopped");
    }
}

/// Validates `args`, binds everything and spawns the node's tasks (for
/// embedding: no log control, no signals, no systemd).
pub async fn start(args: RunArgs) -> Result<Running, StartError> {
    let plan = plan(args).map_err(StartError::Config)?;
    run(plan, None).await
}

/// Entry point of `constellationd run`: `source` is where the
/// configuration came from when `--config` was given (for SIGHUP).
pub fn main(args: RunArgs, source: Option<Source>) -> ExitCode {
    let (log, log_warning) = crate::logging::init(args.log_level, args.log_format);
    if let Some(w) = log_warning {
        warn!("{w}");
    }
    let plan = match plan(args) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("constellationd: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = match crate::runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("constellationd: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let main = async {
        // Before anything binds: no signal may find the default action.
        let mut signals = Signals::install();
        let node = run(plan, Some(log.clone())).await?;
        let cancel = node.cancel.clone();
        notify::ready(&format!(
            "serving {} peers on {}",
            node.state.cluster, node.state.listen
        ));
        if let Some(every) = notify::watchdog_every() {
            info!(
                every_ms = every.as_millis() as u64,
                "systemd watchdog enabled"
            );
            tokio::spawn(notify::watchdog(every, cancel.clone()));
        }
        let mut reloader = Reloader {
            log,
            source,
            handlers: node.handlers.clone(),
            socket: node.socket.clone(),
            state: node.state.clone(),
        };
        if node.state.multicast {
            tokio::spawn(watch_beacons(node.state.clone(), cancel.clone()));
        }
        loop {
            tokio::select! {
                signal = signals.next() => match signal {
                    Signal::Stop(name) => {
                        info!("{name} received");
                        break;
                    }
                    Signal::Hangup => reloader.on_hangup(),
                },
                () = cancel.cancelled() => {
                    info!("shutdown requested");
                    break;
                }
            }
        }
        notify::stopping();
        cancel.cancel();
        node.wait().await;
        Ok::<_, StartError>(())
    };
    match rt.block_on(main) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("constellationd: {e}");
            e.exit_code()
        }
    }
}

/// Feeds discovery's counters to the beacon watch every few beacon rounds
/// ([`beaconwatch::window`] of the current interval), woken by the rounds
/// themselves: the watch costs no timer and no wake-up of its own, and it
/// stops with the beacons (a node without multicast never starts it).
async fn watch_beacons(state: Arc<NodeState>, cancel: CancellationToken) {
    let d = &state.discovery;
    let mut watch = BeaconWatch::default();
    // Rounds left until the next sample; the first round is the baseline.
    let mut left = 0u32;
    loop {
        tokio::select! {
            biased;
            () = cancel.cancelled() => break,
            () = d.beacon_round.notified() => {}
        }
        if left > 1 {
            left -= 1;
            continue;
        }
        let interval = match d.interval_ms.load(Ordering::Relaxed) {
            0 => state.beacon_interval,
            ms => Duration::from_millis(ms),
        };
        // As many rounds as fit the window (at least one).
        let rounds = beaconwatch::window(interval).as_secs_f64() / interval.as_secs_f64().max(1e-3);
        left = rounds.round().clamp(1.0, 1e6) as u32;
        let sample = beaconwatch::Sample {
            sent: d.beacons_sent.load(Ordering::Relaxed),
            send_errors: d.send_errors.load(Ordering::Relaxed),
            own_heard: d.own_heard.load(Ordering::Relaxed),
        };
        let now = tokio::time::Instant::now().into_std();
        for finding in watch.on_sample(now, sample) {
            log_finding(&state, finding);
        }
    }
}

/// Logs what the beacon watch found.
fn log_finding(state: &NodeState, finding: Finding) {
    let ifaces: Vec<&str> = state.interfaces.iter().map(|i| i.name.as_str()).collect();
    let ifaces = ifaces.join(", ");
    match finding {
        Finding::SendErrors { failed, over } => warn!(
            failed, over_s = over.as_secs(), interfaces = %ifaces,
            "beacons fail to send: peers cannot find this node by multicast (interface down or no multicast route?)"
        ),
        Finding::NotLoopingBack { sent, ever: true } => warn!(
            sent, interfaces = %ifaces,
            "own multicast beacons stopped looping back: multicast may be blocked on these interfaces"
        ),
        Finding::NotLoopingBack { sent, ever: false } => warn!(
            sent, interfaces = %ifaces,
            "own multicast beacons never looped back: multicast may be blocked on these interfaces"
        ),
        Finding::LoopingBackAgain => {
            info!(interfaces = %ifaces, "own multicast beacons loop back again")
        }
    }
}

/// What SIGHUP does: re-read the `--config` file and apply what can change
/// while the node runs.
///
/// - `log-level` and `log-format` apply at once, and so do the handler
///   keys (`handler`, `handler-concurrency`, `handler-backlog`,
///   `handler-timeout`): runs in progress finish, new events see the new
///   handlers.
/// - `tag` applies at once, as `PATCH /v1/self/tags` does: the new tags
///   are the configured ones (runtime changes stay laid over them), and
///   every linked peer gets this node's record again and reports
///   `peer_updated`, with no link flap and no restart seen.
/// - Every other key that changed is named in a warning: it takes effect
///   at the next restart. It stays "changed" for later reloads until then.
/// - A file that cannot be read or parsed, or holds a bad value, changes
///   nothing and is reported with the reason.
///
/// Without `--config`, SIGHUP is logged and ignored.
#[derive(Debug)]
pub struct Reloader {
    log: LogControl,
    /// The running configuration's source and values.
    source: Option<Source>,
    /// The handler dispatcher.
    handlers: crate::handlers::Control,
    /// The control socket (for the handlers' environment).
    socket: PathBuf,
    /// The node (its tags, and its links to tell of them).
    state: Arc<NodeState>,
}

/// Keys a reload applies while the node runs.
pub const LIVE_KEYS: [&str; 7] = [
    "tag",
    "log-level",
    "log-format",
    "handler",
    "handler-concurrency",
    "handler-backlog",
    "handler-timeout",
];

impl Reloader {
    fn on_hangup(&mut self) {
        let Some(running) = self.source.as_mut() else {
            info!("SIGHUP received; no --config file to reload, ignoring");
            return;
        };
        notify::reloading();
        let file = running.path.display().to_string();
        match configfile::reload(running) {
            Err(why) => warn!(
                %file, error = %why,
                "SIGHUP received; config reload failed, keeping the running configuration"
            ),
            Ok((args, now)) => {
                let changed = configfile::changed(running, &now);
                let (live, restart): (Vec<String>, Vec<String>) = changed
                    .into_iter()
                    .partition(|k| LIVE_KEYS.contains(&k.as_str()));
                let mut applied = Vec::new();
                if live.iter().any(|k| k.starts_with("handler")) {
                    // All four together: one consistent dispatcher config.
                    self.handlers
                        .apply(crate::handlers::Config::from_args(&args, &self.socket));
                }
                for key in &live {
                    let ok = match key.as_str() {
                        k if k.starts_with("handler") => true,
                        "tag" => {
                            apply_tags(&self.state, &args);
                            true
                        }
                        "log-level" => match self.log.set_level(args.log_level) {
                            Ok(()) => true,
                            Err(error) => {
                                warn!(%error, "cannot change the log level");
                                false
                            }
                        },
                        _ => {
                            self.log.set_format(args.log_format);
                            true
                        }
                    };
                    if ok {
                        let v = now.values.get(key).cloned().unwrap_or_default();
                        applied.push(format!("{key}={}", v.join(",")));
                        running.values.insert(key.clone(), v);
                    }
                }
                if applied.is_empty() {
                    info!(%file, "SIGHUP received; config reloaded, nothing to apply");
                } else {
                    info!(%file, applied = %applied.join(" "), "SIGHUP received; config reloaded");
                }
                if !restart.is_empty() {
                    warn!(
                        %file, keys = %restart.join(", "),
                        "changed in the config file but only take effect at the next restart"
                    );
                }
            }
        }
        notify::ready("reloaded");
    }
}

/// New configured tags from a reload, told to every linked peer.
fn apply_tags(state: &NodeState, args: &RunArgs) {
    {
        let configured: Tags = args.tag.iter().cloned().collect();
        let (tags, version, changed) = state.tags.set_configured(configured);
        if changed {
            let sent_to = state.send_self_record(state.linked());
            info!(tags = ?tags, version, sent_to, "tags changed by config reload");
            state.publish(
                "self_updated",
                || serde_json::json!({ "tags": tags, "tags_version": version }),
            );
        }
    }
}

/// A signal the daemon acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Signal {
    /// Stop gracefully (its name, for the log).
    Stop(&'static str),
    /// Reload.
    Hangup,
}

/// The signal handlers, installed before anything binds so that no signal
/// finds the default action (which for SIGHUP and SIGQUIT is to die
/// without a goodbye).
///
/// - SIGTERM (`docker stop`, systemd), SIGINT (Ctrl-C) and SIGQUIT: a
///   graceful stop. As PID 1 in a container there is no default handler,
///   so each is handled explicitly.
/// - SIGHUP (`systemctl reload`, or a closed terminal): [`Reloader`].
/// - SIGPIPE is ignored by the Rust runtime; writes report `EPIPE` instead.
struct Signals {
    handlers: Option<[tokio::signal::unix::Signal; 4]>,
}

impl Signals {
    fn install() -> Signals {
        use tokio::signal::unix::{signal, SignalKind};
        let handlers = (|| {
            Ok::<_, std::io::Error>([
                signal(SignalKind::terminate())?,
                signal(SignalKind::interrupt())?,
                signal(SignalKind::quit())?,
                signal(SignalKind::hangup())?,
            ])
        })();
        match handlers {
            Ok(h) => Signals { handlers: Some(h) },
            Err(error) => {
                warn!(%error, "cannot install signal handlers; stop with POST /v1/leave");
                Signals { handlers: None }
            }
        }
    }

    /// The next signal. Cancel-safe (each `recv` is).
    async fn next(&mut self) -> Signal {
        let Some([term, int, quit, hup]) = self.handlers.as_mut() else {
            return std::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => Signal::Stop("SIGTERM"),
            _ = int.recv() => Signal::Stop("SIGINT"),
            _ = quit.recv() => Signal::Stop("SIGQUIT"),
            _ = hup.recv() => Signal::Hangup,
        }
    }
}

async fn run(plan: Plan, log: Option<LogControl>) -> Result<Running, StartError> {
    let Plan {
        args,
        name,
        interfaces,
        prefixes,
        socket: socket_path,
        tags,
        keyring,
    } = plan;
    let keyring: Option<SharedKeyring> = keyring.map(|k| Arc::new(RwLock::new(k)));
    let state_dir = state_dir(&args);
    // Runtime tag changes saved in the state directory lie over the
    // configured tags.
    let (local_tags, tags_warning) = crate::tags::LocalTags::load(tags, state_dir.as_deref());
    if let Some(w) = tags_warning {
        warn!("{w}");
    }
    let tags = local_tags.get();
    let id = NodeId::random();
    // Wall-clock milliseconds: grows across restarts with no state on disk.
    let incarnation = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(1);

    // The first socket bound: an address this host cannot use is a
    // configuration error (exit 2), a port in use a runtime one (exit 1).
    // The default wildcard `0.0.0.0` becomes `[::]` (both families) when
    // the node discovers over IPv6, so that IPv6 peers can dial it.
    let ipv6 = args.group.is_ipv6() || interfaces.iter().any(|i| i.addr.is_ipv6());
    let listen_on = match args.listen {
        SocketAddr::V4(l) if ipv6 && l.ip().is_unspecified() => {
            SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, l.port()))
        }
        l => l,
    };
    let listener = match TcpListener::bind(listen_on).await {
        Ok(l) => l,
        Err(e) if e.kind() == std::io::ErrorKind::AddrNotAvailable => {
            return Err(StartError::Config(format!(
                "--listen {}: {} is not an address of this host ({e})",
                args.listen,
                args.listen.ip()
            )))
        }
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            return Err(StartError::Config(format!(
                "--listen {}: not allowed for this user ({e}); ports below 1024 need CAP_NET_BIND_SERVICE",
                args.listen
            )))
        }
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            return Err(StartError::Start(anyhow::anyhow!(
                "cannot listen on {} (--listen): the port is in use (another constellationd?)",
                args.listen
            )))
        }
        Err(e) => {
            return Err(StartError::Start(
                anyhow::Error::new(e).context(format!("cannot listen on {} (--listen)", args.listen)),
            ))
        }
    };
    let listen = listener.local_addr().context("listener address")?;
    // A listener on one address (not a wildcard) is dialled there: it is
    // what the node advertises unless --advertise says otherwise (`--listen
    // [::1]:0` with `--interface lo` must not advertise 127.0.0.1).
    let advertise = match &args.advertise {
        Some(a) => Some(advertise_addr(a, &interfaces, listen.port()).await?),
        None => (!listen.ip().is_unspecified()).then_some(listen),
    };

    // The peer table's confirmed live members, which pace discovery's
    // beacons and replies (the table task keeps it current).
    let members = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // This node's incarnation now: the start's until the peer table
    // refutes a report of our failure (overlay mode) and raises it. The
    // membership task writes it; beacons and handshakes read it.
    let live_incarnation = Arc::new(AtomicU64::new(incarnation));
    let max_links = usize::try_from(args.max_links).unwrap_or(usize::MAX);
    // Ping rounds, link silence and liveness reports, from the failure
    // detector's settings (the simulator derives them the same way).
    let timing = proto::link::LinkTiming::derive(args.suspect_after, args.dead_after);
    let disc_cfg = discovery::Config {
        group: args.group,
        interfaces,
        ttl: args.ttl,
        interval: args.beacon_interval,
        cluster: args.cluster.clone(),
        limits: Limits {
            stale_after: args.dead_after,
            ..Limits::default()
        },
        keyring: keyring.clone(),
        allow_advertise: args.allow_advertise.clone(),
        members: Some(members.clone()),
        incarnation: Some(live_incarnation.clone()),
        // Periodic beacons ride on the links' ping rounds.
        rounds: Some(timing.ping_interval),
    };
    let local = discovery::LocalIdentity {
        id,
        incarnation,
        name: name.clone(),
        data_port: listen.port(),
        advertise,
        digest: tags_digest(&tags),
    };
    let multicast = !args.no_multicast;
    // With --no-multicast nothing is bound for discovery: the interfaces
    // still say what we advertise and which addresses are ours to dial.
    let (bound, advertised, in_use, disc_stats) = if multicast {
        let bound = discovery::bind(disc_cfg, local).context("discovery")?;
        let (adv, ifs, st) = (bound.advertised(), bound.interfaces(), bound.stats());
        (Some(bound), adv, ifs, st)
    } else {
        let ifs = disc_cfg.interfaces.clone();
        let adv = ifs
            .iter()
            .map(|i| advertise.unwrap_or_else(|| i.socket_addr(listen.port())))
            .collect();
        (None, adv, ifs, Arc::new(discovery::Stats::default()))
    };
    // Addresses heard on links are judged against every address (both
    // families) of the interfaces in use, like beacons are against theirs.
    let rule = proto::addr_rule::AddrRule::from_prefixes(
        prefixes.iter().copied(),
        args.allow_advertise.iter().copied(),
    );
    let remembered = match &state_dir {
        Some(dir) => match crate::statefile::load(dir) {
            Ok(addrs) => addrs,
            Err(error) => {
                warn!(%error, "remembered peers not used");
                Vec::new()
            }
        },
        None => Vec::new(),
    };
    let mut seed_specs = args.seed.clone();
    seed_specs.extend(remembered.iter().map(|a| crate::seeds::SeedSpec {
        host: a.ip().to_string(),
        port: Some(a.port()),
    }));
    if !multicast && seed_specs.is_empty() {
        warn!("--no-multicast with no --seed and no remembered peers: this node only finds peers that dial it");
    }
    let control =
        socket::bind(&socket_path, args.socket_mode).map_err(|e| StartError::Start(e.into()))?;

    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    let hello = Hello {
        protocol: VERSION,
        cluster: args.cluster.clone(),
        id,
        incarnation,
        name: name.clone(),
        addr: advertised[0],
        tags: tags.clone(),
    };
    let mut tcfg = transport::Config::new(hello.clone());
    tcfg.incarnation = Some(live_incarnation.clone());
    tcfg.max_frame = args.max_frame as usize;
    tcfg.keyring = keyring.clone();
    tcfg.ping_interval = timing.ping_interval;
    tcfg.link_timeout = timing.link_timeout;
    tcfg.liveness_report = timing.liveness_report;
    let (trans_tx, trans_rx) = mpsc::channel(4096);
    let (disc_tx, disc_rx) = mpsc::channel(1024);
    let transport = transport::Transport::start(listener, tcfg, trans_tx, cancel.clone(), &tracker);

    let (queries, query_inbox) = crate::query::QueryHandle::new();
    let (relay, relay_inbox) = crate::relay::RelayHandle::new();
    let (table_commands, table_commands_rx) = mpsc::channel(64);
    let state = Arc::new(NodeState {
        id,
        name: name.clone(),
        cluster: args.cluster.clone(),
        incarnation,
        live_incarnation: live_incarnation.clone(),
        overlay: crate::state::OverlayCounters {
            max_links: args.max_links,
            ..Default::default()
        },
        started: Instant::now(),
        tags: local_tags,
        interfaces: in_use,
        advertised: advertised.clone(),
        listen,
        group: args.group,
        ttl: args.ttl,
        beacon_interval: args.beacon_interval,
        peers: DashMap::new(),
        events: EventBus::default(),
        discovery: disc_stats,
        transport,
        transitions: proto::stats::Tally::default(),
        table: Default::default(),
        multicast,
        seeds: Default::default(),
        state_dir: state_dir.clone(),
        messages_in: AtomicU64::new(0),
        messages_out: AtomicU64::new(0),
        keyring,
        secret_file: args.secret_file.clone(),
        log,
        handlers: Default::default(),
        queries,
        relay,
        table_commands,
    });
    // Subscribed before the membership task publishes its first event.
    let handlers = crate::handlers::spawn(
        state.clone(),
        crate::handlers::Config::from_args(&args, &socket_path),
        cancel.clone(),
        &tracker,
    );
    tracker.spawn(crate::query::run(
        state.clone(),
        query_inbox,
        cancel.clone(),
    ));
    tracker.spawn(crate::relay::run(
        state.clone(),
        relay_inbox,
        cancel.clone(),
    ));

    let table_cfg = TableConfig {
        suspect_after: args.suspect_after,
        dead_after: args.dead_after,
        // Three beacon intervals: a degraded peer survives a lost beacon.
        beacon_dead_after: (args.beacon_interval * 3).max(args.dead_after),
        tombstone_ttl: args.tombstone_ttl,
        // --max-links 0: the full mesh, exactly as before.
        overlay: (max_links > 0).then_some(max_links),
        // Member lists in frames well under --max-frame (which drops a
        // larger one), with room for framing and sealing.
        max_list_bytes: usize::try_from(args.max_frame / 2).unwrap_or(usize::MAX),
        ..TableConfig::default()
    };
    let mut table = PeerTable::new(id, table_cfg, rand::random());
    let overlay = (max_links > 0).then(|| {
        // The table learns who we are, so that it can refute.
        table.set_local(&hello);
        table_task::OverlayHooks {
            driver: proto::overlay::Driver::new(id, max_links),
            incarnation: live_incarnation.clone(),
        }
    });
    let seed_tx = (!seed_specs.is_empty()).then(|| {
        let (tx, rx) = mpsc::channel(256);
        let seeds = crate::seeds::Seeds::new(
            seed_specs,
            crate::seeds::Config::default(),
            Instant::now(),
            rand::random(),
        );
        let mut own = advertised.clone();
        own.push(listen);
        tracker.spawn(crate::seeds::task::run(
            seeds,
            state.clone(),
            rx,
            listen.port(),
            own,
            cancel.clone(),
        ));
        tx
    });
    let remember_tx = state_dir.clone().map(|dir| {
        let (tx, rx) = tokio::sync::watch::channel(std::collections::BTreeSet::new());
        tracker.spawn(crate::statefile::run(
            dir,
            remembered.clone(),
            rx,
            cancel.clone(),
        ));
        tx
    });
    tracker.spawn(table_task::run(
        table,
        state.clone(),
        disc_rx,
        trans_rx,
        table_task::Hooks {
            report_rule: rule.clone().with_allowed(crate::netif::routes_via(
                &state
                    .interfaces
                    .iter()
                    .map(|i| i.name.as_str())
                    .collect::<Vec<_>>(),
            )),
            rule,
            seeds: seed_tx,
            remember: remember_tx,
            commands: Some(table_commands_rx),
            members: Some(members),
            overlay,
        },
        cancel.clone(),
    ));
    if let Some(bound) = bound {
        let dc = cancel.clone();
        tracker.spawn(async move {
            let _stop_node_on_exit = dc.clone().drop_guard();
            bound.run(disc_tx, dc).await;
        });
    } else {
        drop(disc_tx); // no beacons: the membership task hears only links
    }
    let router = api::router(state.clone(), cancel.clone(), args.max_frame as usize);
    tracker.spawn(api::serve(control, router, cancel.clone(), tracker.clone()));
    tracker.close();

    info!(
        %name, id = %id, cluster = %args.cluster, incarnation,
        listen = %listen, advertise = ?advertised, socket = %socket_path.display(),
        secured = state.keyring.is_some(),
        "node started"
    );

    Ok(Running {
        state,
        cancel,
        handlers,
        tracker,
        socket: socket_path,
    })
}

/// The address `--advertise` names: an IP address as given, or a host name
/// resolved now (the hosts file, then DNS), taking its first address of the
/// family of the first interface (else its first address). A name that does
/// not resolve stops the start (exit 1: it may resolve later).
async fn advertise_addr(
    a: &crate::config::Advertise,
    interfaces: &[discovery::Interface],
    listen_port: u16,
) -> Result<SocketAddr, StartError> {
    use crate::config::Advertise;
    let (host, port) = match a {
        Advertise::Ip(ip, port) => return Ok(SocketAddr::new(*ip, port.unwrap_or(listen_port))),
        Advertise::Host(host, port) => (host, port.unwrap_or(listen_port)),
    };
    let spec = crate::seeds::SeedSpec {
        host: host.clone(),
        port: Some(port),
    };
    let addrs = crate::seeds::task::resolve(&spec, listen_port)
        .await
        .map_err(|e| StartError::Start(anyhow::anyhow!("--advertise {host}: {e}")))?;
    let usable: Vec<SocketAddr> = addrs
        .into_iter()
        .filter(|a| !a.ip().is_unspecified() && !a.ip().is_multicast())
        .collect();
    let v6 = interfaces.first().is_some_and(|i| i.addr.is_ipv6());
    let chosen = usable
        .iter()
        .find(|a| a.is_ipv6() == v6)
        .or(usable.first())
        .copied()
        .ok_or_else(|| {
            StartError::Start(anyhow::anyhow!("--advertise {host}: no usable address"))
        })?;
    info!(%host, advertise = %chosen, "--advertise resolved");
    Ok(chosen)
}

/// `--state-dir`, or the system node's default: root, with the default
/// control socket, remembers peers in /var/lib/constellationd. The directory
/// is created (0700) if missing; one that cannot be is reported and not used.
fn state_dir(args: &RunArgs) -> Option<PathBuf> {
    const SYSTEM: &str = "/var/lib/constellationd";
    let system = crate::socket::is_root() && args.sock.socket.is_none();
    let dir = args
        .state_dir
        .clone()
        .or_else(|| system.then(|| PathBuf::from(SYSTEM)))?;
    let made = std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir);
    match made {
        Ok(()) => Some(dir),
        Err(error) => {
            warn!(dir = %dir.display(), %error, "state directory not usable; peers are not remembered");
            None
        }
    }
}
