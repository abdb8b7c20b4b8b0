//! constellationd, the node: configuration, the daemon that wires discovery
//! and transport around one peer table, the control API on a Unix socket, and
//! the CLI that is a client of that API.
//!
//! - [`config`]: flags, environment, validation.
//! - [`daemon`]: binding, task wiring, signals, graceful shutdown.
//! - [`membership`]: the task that owns the peer table.
//! - [`state`]: the shared read-model and event bus.
//! - [`api`]: HTTP/1.1 + JSON on the control socket.
//! - [`client`], [`cli`]: the CLI.
//! - [`netif`], [`socket`]: interfaces and the control socket path.
//! - [`secret`]: the secret file holding the cluster keys.

pub mod api;
pub mod cli;
pub mod client;
pub mod config;
pub mod daemon;
pub mod membership;
pub mod netif;
pub mod secret;
pub mod seeds;
pub mod socket;
pub mod state;
pub mod statefile;

/// The runtime of every process (daemon and CLI alike): one thread. The
/// node is IO-bound and every task is short; a single thread avoids
/// cross-thread wake-ups, measurably cheaper when idle.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}
