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
                Ok(mut linked) => {
                    linked.remote.addr = rescoped(linked.remote.addr, remote);
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
/// Any other address is kept as it is (with its scope id).
fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(a) => match a.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::from((v4, a.port())),
            None => addr,
        },
        v4 => v4,
    }
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

/// The address a peer's hello advertises, with any IPv6 scope id it sent
/// (an interface index of its own host) replaced by the connection's: a
/// link-local address is on the link this connection runs over.
pub(crate) fn rescoped(advertised: SocketAddr, connection: SocketAddr) -> SocketAddr {
    proto::addr_rule::scoped_like(proto::addr_rule::unscoped(advertised), connection)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_addresses_become_ipv4_and_scopes_are_kept() {
        let sa = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert_eq!(canonical(sa("[::ffff:10.0.0.1]:9")), sa("10.0.0.1:9"));
        assert_eq!(canonical(sa("[fe80::1%3]:9")), sa("[fe80::1%3]:9"));
        assert_eq!(canonical(sa("10.0.0.1:9")), sa("10.0.0.1:9"));
        assert_eq!(
            rescoped(sa("[fe80::2%7]:6777"), sa("[fe80::2%3]:4000")),
            sa("[fe80::2%3]:6777")
        );
        assert_eq!(
            rescoped(sa("[fd00::2]:6777"), sa("[fe80::2%3]:4000")),
            sa("[fd00::2]:6777")
        );
    }
}
