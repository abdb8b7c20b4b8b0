//! One dial: connect, run the dialer's handshake, hand the link to the
//! actor or report the failure to the node. When to dial (and back off) is
//! the peer table's decision.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use proto::link::Handshake;
use proto::NodeId;
use tokio::sync::mpsc;
use tracing::debug;

use crate::config::{now, Config};
use crate::event::TransportEvent;
use crate::handshake;
use crate::inbox::{Handoff, ToActor};
use crate::stats::Stats;

/// Dials `id` at `addr`; the outcome is a link (through the actor) or a
/// [`TransportEvent::DialFailed`].
pub(crate) async fn run(
    id: NodeId,
    addr: SocketAddr,
    cfg: Arc<Config>,
    stats: Arc<Stats>,
    inbox: mpsc::Sender<ToActor>,
    events: mpsc::Sender<TransportEvent>,
) {
    let linked = match handshake::connect(addr, cfg.connect_timeout).await {
        Ok(stream) => {
            handshake::nodelay(&stream);
            handshake::run(stream, Handshake::dial(now(), cfg.handshake())).await
        }
        Err(e) => Err(e),
    };
    match linked {
        Ok(mut linked) => {
            linked.remote.addr = crate::listener::rescoped(linked.remote.addr, addr);
            let handoff = Handoff {
                linked,
                outbound: true,
                addr,
            };
            if inbox
                .send(ToActor::Linked(Box::new(handoff)))
                .await
                .is_err()
            {
                debug!("transport stopped during dial");
            }
        }
        Err(e) => {
            stats.dial_failures.fetch_add(1, Ordering::Relaxed);
            if let Some(reason) = e.drop_reason() {
                stats.drops.record(now(), reason);
            }
            let ev = TransportEvent::DialFailed {
                id,
                addr,
                why: e.dial_failure(),
                detail: format!("{addr}: {e}"),
            };
            if events.send(ev).await.is_err() {
                debug!("node stopped during dial");
            }
        }
    }
}
