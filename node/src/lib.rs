//! constellationd, the node: configuration, the daemon that wires discovery
//! and transport around one peer table, the control API on a Unix socket, and
//! the CLI that is a client of that API.
//!
//! - [`config`]: flags, environment, validation; [`configfile`]: the
//!   `--config` file and what a reload changes.
//! - [`logging`]: log level and format, the monitor hub.
//! - [`notify`]: the systemd notification protocol.
//! - [`daemon`]: binding, task wiring, signals, graceful shutdown.
//! - [`handlers`]: programs run on cluster events (`--handler`).
//! - [`filter`]: the peer filters of `peers` and `GET /v1/peers`.
//! - [`table_task`]: the task that owns the peer table (`proto::membership::PeerTable`).
//! - [`state`]: the shared read-model and event bus.
//! - [`api`]: HTTP/1.1 + JSON on the control socket; [`ops`]: its
//!   operations routes (log level, monitor).
//! - [`client`], [`cli`], [`cli_ops`], [`cli_auto`]: the CLI.
//! - [`netif`], [`socket`]: interfaces and the control socket path.
//! - [`secret`]: the secret file holding the cluster keys.
//! - [`tags`]: this node's tags, changeable at runtime.
//! - [`query`]: the task that owns the query engine (`proto::query::Queries`).

pub mod api;
pub mod beaconwatch;
pub mod cli;
pub mod cli_auto;
pub mod cli_ops;
pub mod client;
pub mod config;
pub mod configfile;
pub mod daemon;
pub mod filter;
pub mod handlers;
pub mod logging;
pub mod netif;
pub mod notify;
pub mod ops;
pub mod query;
pub mod relay;
pub mod secret;
pub mod seeds;
pub mod socket;
pub mod state;
pub mod statefile;
pub mod table_task;
pub mod tags;

/// The runtime of every process (daemon and CLI alike): one thread. The
/// node is IO-bound and every task is short; a single thread avoids
/// cross-thread wake-ups, measurably cheaper when idle.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}
