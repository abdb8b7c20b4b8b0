//! `constellationd run`: validate, bind, spawn, wait, shut down.
//!
//! Order matters: configuration is checked before anything binds (exit 2 on
//! a bad value); then the TCP listener, the multicast sockets and the control
//! socket are bound (exit 1 with one clear line if any fails); only then are
//! the sibling tasks spawned. One root token stops everything: SIGTERM,
//! SIGINT, SIGQUIT, `POST /v1/leave`, or any essential task ending; SIGHUP
//! is logged and ignored.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicU64;
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

use crate::config::RunArgs;
use crate::state::{EventBus, NodeState};
use crate::{api, membership, netif, secret, socket};

/// How long tasks get to finish after shutdown starts.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Everything `run` needs, checked.
struct Plan {
    args: RunArgs,
    name: String,
    interfaces: Vec<discovery::Interface>,
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
    let (interfaces, missing) =
        netif::resolve(&args.interface).map_err(|e| format!("--interface: {e}"))?;
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
    if let Some((ip, _)) = args.advertise {
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

/// A started node.
#[derive(Debug)]
pub struct Running {
    /// Shared state (read-model, counters).
    pub state: Arc<NodeState>,
    /// Cancelling this stops the node gracefully.
    pub cancel: CancellationToken,
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

/// Validates `args`, binds everything and spawns the node's tasks.
pub async fn start(args: RunArgs) -> Result<Running, StartError> {
    let plan = plan(args).map_err(StartError::Config)?;
    Ok(run(plan).await?)
}

/// Entry point of `constellationd run`.
pub fn main(args: RunArgs) -> ExitCode {
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
        let stop_signal = shutdown_signal();
        let node = run(plan).await?;
        let cancel = node.cancel.clone();
        tokio::select! {
            () = stop_signal => {}
            () = cancel.cancelled() => info!("shutdown requested"),
        }
        cancel.cancel();
        node.wait().await;
        anyhow::Ok(())
    };
    match rt.block_on(main) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("constellationd: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn run(plan: Plan) -> anyhow::Result<Running> {
    let Plan {
        args,
        name,
        interfaces,
        socket: socket_path,
        tags,
        keyring,
    } = plan;
    let keyring: Option<SharedKeyring> = keyring.map(|k| Arc::new(RwLock::new(k)));
    let id = NodeId::random();
    // Wall-clock milliseconds: grows across restarts with no state on disk.
    let incarnation = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(1);

    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {} (--listen)", args.listen))?;
    let listen = listener.local_addr().context("listener address")?;
    let advertise = args.advertise.map(|(ip, port): (IpAddr, Option<u16>)| {
        SocketAddr::new(ip, port.unwrap_or(listen.port()))
    });

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
    };
    let local = discovery::LocalIdentity {
        id,
        incarnation,
        name: name.clone(),
        data_port: listen.port(),
        advertise,
        digest: tags_digest(&tags),
    };
    let bound = discovery::bind(disc_cfg, local).context("discovery")?;
    let advertised = bound.advertised();
    let control = socket::bind(&socket_path, args.socket_mode)?;

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
    let mut tcfg = transport::Config::new(hello);
    tcfg.max_frame = args.max_frame as usize;
    tcfg.keyring = keyring.clone();
    // Link liveness reaches the peer table in batches this often: small
    // against --suspect-after, large against the ping rate.
    tcfg.liveness_report =
        (args.suspect_after / 12).clamp(Duration::from_millis(10), Duration::from_millis(200));
    // Pings often enough that silence means something well within
    // --suspect-after, and links that go quiet are closed before --dead-after.
    tcfg.ping_interval =
        (args.suspect_after / 4).clamp(Duration::from_millis(20), Duration::from_secs(1));
    tcfg.link_timeout = args
        .dead_after
        .mul_f64(2.0 / 3.0)
        .max(tcfg.ping_interval * 3);
    let (trans_tx, trans_rx) = mpsc::channel(4096);
    let (disc_tx, disc_rx) = mpsc::channel(1024);
    let transport = transport::Transport::start(listener, tcfg, trans_tx, cancel.clone(), &tracker);

    let state = Arc::new(NodeState {
        id,
        name: name.clone(),
        cluster: args.cluster.clone(),
        incarnation,
        started: Instant::now(),
        tags,
        interfaces: bound.interfaces(),
        advertised: advertised.clone(),
        listen,
        group: args.group,
        ttl: args.ttl,
        beacon_interval: args.beacon_interval,
        peers: DashMap::new(),
        events: EventBus::default(),
        discovery: bound.stats(),
        transport,
        transitions: proto::stats::Tally::default(),
        table: Default::default(),
        messages_in: AtomicU64::new(0),
        messages_out: AtomicU64::new(0),
        keyring,
        secret_file: args.secret_file.clone(),
    });

    let table_cfg = TableConfig {
        suspect_after: args.suspect_after,
        dead_after: args.dead_after,
        // Three beacon intervals: a degraded peer survives a lost beacon.
        beacon_dead_after: (args.beacon_interval * 3).max(args.dead_after),
        tombstone_ttl: args.tombstone_ttl,
        ..TableConfig::default()
    };
    let table = PeerTable::new(id, table_cfg, rand::random());
    tracker.spawn(membership::run(
        table,
        state.clone(),
        disc_rx,
        trans_rx,
        bound.addr_rule(),
        cancel.clone(),
    ));
    let dc = cancel.clone();
    tracker.spawn(async move {
        let _stop_node_on_exit = dc.clone().drop_guard();
        bound.run(disc_tx, dc).await;
    });
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
        tracker,
        socket: socket_path,
    })
}

/// Installs the signal handlers now and returns the future that resolves
/// when the node should stop. Installed before anything binds, so no
/// signal finds the default action (which for SIGHUP and SIGQUIT is to die
/// without a goodbye).
///
/// - SIGTERM (`docker stop`, systemd), SIGINT (Ctrl-C) and SIGQUIT: a
///   graceful stop. As PID 1 in a container there is no default handler,
///   so each is handled explicitly.
/// - SIGHUP (a closed terminal, or `systemctl reload`): logged and ignored
///   until reloading exists.
/// - SIGPIPE is ignored by the Rust runtime; writes report `EPIPE` instead.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let handlers = (|| {
        Ok::<_, std::io::Error>((
            signal(SignalKind::terminate())?,
            signal(SignalKind::interrupt())?,
            signal(SignalKind::quit())?,
            signal(SignalKind::hangup())?,
        ))
    })();
    async move {
        let (mut term, mut int, mut quit, mut hup) = match handlers {
            Ok(h) => h,
            Err(error) => {
                warn!(%error, "cannot install signal handlers; stop with POST /v1/leave");
                return std::future::pending().await;
            }
        };
        loop {
            tokio::select! {
                _ = term.recv() => {
                    info!("SIGTERM received");
                    return;
                }
                _ = int.recv() => {
                    info!("SIGINT received");
                    return;
                }
                _ = quit.recv() => {
                    info!("SIGQUIT received");
                    return;
                }
                _ = hup.recv() => info!("SIGHUP received; reload is not supported yet, ignoring"),
            }
        }
    }
}

/// Initialises logging from `RUST_LOG` (default `info`), to standard error.
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(
            std::io::IsTerminal::is_terminal(&std::io::stderr())
                && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()),
        )
        .with_target(false)
        .init();
}
