//! The listener: accepts connections and runs each inbound handshake in a
//! task of its own, bounded in number (a semaphore) and in time (the
//! handshake's deadline). Completed handshakes go to the actor.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use proto::link::Handshake;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::config::{now, Config};
use crate::handshake::{self, Failure};
use crate::inbox::{Handoff, ToActor};
use crate::stats::Stats;

/// Accepts until `cancel` fires. The listener may be bound to an IPv4 or
/// IPv6 address (`[::]` accepts both families on Linux unless
/// `net.ipv6.bindv6only` is set; peers' link-local addresses come with
/// their scope id). An essential subsystem: if it ends, the
/// node ends.
pub(crate) async fn run(
    listener: TcpListener,
    cfg: Arc<Config>,
    stats: Arc<Stats>,
    inbox: mpsc::Sender<ToActor>,
    cancel: CancellationToken,
    tracker: TaskTracker,
) {
    let _stop_node_on_exit = cancel.clone().drop_guard();
    let pending = Arc::new(Semaphore::new(cfg.max_pending_handshakes));
    loop {
        let accepted = tokio::select! {
            () = cancel.cancelled() => break,
            accepted = listener.accept() => accepted, // cancel-safe
        };
        let (stream, remote) = match accepted {
            // A dual-stack `[::]` listener sees IPv4 peers as
            // `::ffff:a.b.c.d`: name them as the IPv4 addresses they are,
            // so that they match what beacons and seeds say.
            Ok((stream, remote)) => (stream, canonical(remote)),
            Err(error) => {
                // EMFILE and friends: back off briefly rather than spin.
                warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = pending.clone().try_acquire_owned() else {
            stats.drops.record(now(), "handshake_backlog");
            continue; // dropping the stream closes it
        };
        let (cfg, stats, inbox) = (cfg.clone(), stats.clone(), inbox.clone());
        tracker.spawn(async move {
            let _permit = permit;
            handshake::nodelay(&stream);
            let hs = Handshake::accept(now(), cfg.handshake());
            match handshake::run(stream, hs).await {
                Ok(linked) => {
                    let handoff = Handoff {
                        linked,
                        outbound: false,
                        addr: remote,
                    };
                    if inbox
                        .send(ToActor::Linked(Box::new(handoff)))
                        .await
                        .is_err()
                    {
                        debug!("transport stopped during handshake");
                    }
                }
                Err(e) => log_failure(&stats, remote, &e),
            }
        });
    }
}

/// `addr` with an IPv4-mapped IPv6 address turned into its IPv4 address.
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// A refusal that is the peer's fault is counted, and logged loudly once
/// per window of its kind; anything else (a peer that went away) quietly.
fn log_failure(stats: &Stats, remote: SocketAddr, e: &Failure) {
    match e.drop_reason() {
        Some(reason) => {
            if stats.drops.record(now(), reason) {
                warn!(%remote, error = %e, "refused link (further refusals of this kind are counted)");
            }
        }
        None => debug!(%remote, error = %e, "inbound handshake failed"),
    }
}
