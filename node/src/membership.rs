//! The membership task: sole owner of the sans-IO peer table.
//!
//! Discovery and transport run as sibling tasks and send what they observe
//! here; this task applies it to the `PeerTable` (with `now` from tokio's
//! clock), then mirrors every change into the read-model, logs it, publishes
//! it on the event bus, and turns the table's actions into dials.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use discovery::DiscoveryEvent;
use proto::frame::{PeerList, PeerRecord};
use proto::membership::{Action, DialFailure, EventKind, LinkState, Peer, PeerTable};
use proto::Message;
use proto::NodeId;
use rand::seq::SliceRandom;
use serde_json::json;
use tokio::sync::mpsc;
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use transport::TransportEvent;

use crate::state::{peer_json, NodeState};

fn now_std() -> std::time::Instant {
    Instant::now().into_std()
}

/// Runs until `cancel` fires or both input channels close.
pub async fn run(
    mut table: PeerTable,
    state: Arc<NodeState>,
    mut disc_rx: mpsc::Receiver<DiscoveryEvent>,
    mut trans_rx: mpsc::Receiver<TransportEvent>,
    cancel: CancellationToken,
) {
    let _stop_node_on_exit = cancel.clone().drop_guard();
    let idle = Duration::from_secs(3600);
    loop {
        let deadline = table
            .next_deadline()
            .map(Instant::from_std)
            .unwrap_or_else(|| Instant::now() + idle);
        tokio::select! {
            biased;
            () = cancel.cancelled() => break,
            ev = trans_rx.recv() => match ev {
                Some(TransportEvent::Heard(heard)) => {
                    for h in heard {
                        match h.rtt {
                            Some(rtt) => table.on_pong(h.at, h.id, rtt),
                            None => table.on_traffic(h.at, h.id),
                        }
                        sync(&table, &state, h.id);
                    }
                }
                Some(ev) => {
                    let id = on_transport(&mut table, &state, ev);
                    sync(&table, &state, id);
                }
                None => break,
            },
            ev = disc_rx.recv() => match ev {
                Some(DiscoveryEvent::Beacon { at, beacon, .. }) => {
                    table.on_beacon(at, &beacon);
                    sync(&table, &state, beacon.id);
                }
                None => break,
            },
            () = sleep_until(deadline) => table.on_tick(now_std()),
        }
        drain(&mut table, &state);
    }
}

/// Keeps the read-model's copy of `id` current between events: only the
/// fields that change without one (last seen, last beacon, RTT), so the hot
/// path (a pong per link every few hundred ms) allocates nothing. Every event
/// replaces the whole entry.
fn sync(table: &PeerTable, state: &NodeState, id: NodeId) {
    if let Some(p) = table.get(&id) {
        if let Some(mut slot) = state.peers.get_mut(&id) {
            slot.last_seen = p.last_seen;
            slot.last_beacon = p.last_beacon;
            slot.rtt = p.rtt;
        }
    }
}

/// Applies one transport event; returns the peer it concerned.
fn on_transport(table: &mut PeerTable, state: &NodeState, ev: TransportEvent) -> NodeId {
    let now = now_std();
    match ev {
        TransportEvent::LinkUp { hello, .. } => {
            table.on_link_up(now, &hello);
            hello.id
        }
        TransportEvent::LinkDown {
            id,
            goodbye,
            graceful,
            reason,
        } => {
            if goodbye {
                table.on_goodbye(now, id);
            }
            if let Some(p) = table.get(&id) {
                info!(peer = %p.name, id = %id.short(), addr = %p.addr, %reason, "link down");
            }
            table.on_link_down(now, id, graceful || goodbye);
            id
        }
        TransportEvent::DialFailed {
            id, why, detail, ..
        } => {
            if why != DialFailure::Duplicate {
                tracing::debug!(id = %id.short(), ?why, %detail, "dial failed");
            }
            table.on_dial_failed(now, id, why);
            id
        }
        TransportEvent::Heard(_) => unreachable!("handled in the loop"),
        TransportEvent::Peers { id, list } => {
            table.on_traffic(now, id);
            on_peer_list(table, state, now, id, list);
            id
        }
        TransportEvent::Message { id, msg } => {
            table.on_traffic(now, id);
            state.messages_in.fetch_add(1, Ordering::Relaxed);
            let from_name = table.get(&id).map(|p| p.name.clone());
            // Built only when someone subscribes to /v1/events.
            state.publish("message", || {
                let b64 = base64::engine::general_purpose::STANDARD.encode(&msg.payload);
                let text = std::str::from_utf8(&msg.payload).ok();
                json!({
                    "from": id.to_string(),
                    "from_name": from_name,
                    "topic": msg.topic,
                    "payload": text,
                    "payload_b64": b64,
                })
            });
            id
        }
    }
}

/// How many linked peers are asked about a suspect peer.
const PROBE_FANOUT: usize = 3;

/// Asks a few linked peers whether they hear `id` directly.
fn probe(table: &PeerTable, state: &NodeState, id: NodeId) {
    let Some(p) = table.get(&id) else { return };
    let mut helpers: Vec<NodeId> = table
        .peers()
        .filter(|h| h.id != id && h.link == LinkState::Up)
        .map(|h| h.id)
        .collect();
    helpers.shuffle(&mut rand::thread_rng());
    helpers.truncate(PROBE_FANOUT);
    if helpers.is_empty() {
        return;
    }
    let ask = Message::Peers(PeerList {
        peers: vec![record(p, "probe", None)],
    });
    let transport = state.transport.clone();
    // Off the membership loop: the transport answers through its actor.
    tokio::spawn(async move {
        for h in helpers {
            if let Err(error) = transport.try_send(h, ask.clone()).await {
                debug!(helper = %h.short(), %error, "probe not sent");
            }
        }
    });
}

fn record(p: &Peer, state: &str, age: Option<Duration>) -> PeerRecord {
    PeerRecord {
        id: p.id,
        incarnation: p.incarnation,
        name: p.name.clone(),
        addr: p.addr,
        state: state.into(),
        age_ms: age.map(|a| a.as_millis() as u64),
    }
}

/// Answers probes with our *direct* evidence, and feeds reports to the table.
fn on_peer_list(
    table: &mut PeerTable,
    state: &NodeState,
    now: std::time::Instant,
    from: NodeId,
    list: PeerList,
) {
    let fresh = table.config().suspect_after;
    let mut answers = Vec::new();
    for r in list.peers {
        match (r.state.as_str(), r.age_ms) {
            ("probe", _) => {
                if let Some(p) = table.get(&r.id).filter(|p| p.is_live()) {
                    let age = now.saturating_duration_since(p.last_seen);
                    if age < fresh && p.incarnation == r.incarnation {
                        answers.push(record(p, "alive", Some(age)));
                    }
                }
            }
            ("alive", Some(age_ms)) => {
                table.on_vouch(now, r.id, r.incarnation, Duration::from_millis(age_ms))
            }
            _ => {} // other reports are not used
        }
    }
    if answers.is_empty() {
        return;
    }
    let transport = state.transport.clone();
    let reply = Message::Peers(PeerList { peers: answers });
    tokio::spawn(async move {
        if let Err(error) = transport.try_send(from, reply).await {
            debug!(to = %from.short(), %error, "probe answer not sent");
        }
    });
}

/// Mirrors table events into the read-model, logs and the bus; starts dials.
fn drain(table: &mut PeerTable, state: &NodeState) {
    let now = now_std();
    while let Some(ev) = table.poll_event() {
        let peer = match ev.kind {
            EventKind::Reaped => state.peers.remove(&ev.id).map(|(_, p)| p),
            _ => table.get(&ev.id).cloned().inspect(|p| {
                state.peers.insert(ev.id, p.clone());
            }),
        };
        let Some(p) = peer else { continue };
        state.transitions.record(now, ev.kind.as_str());
        let id = p.id.short();
        match ev.kind {
            EventKind::Joined => info!(peer = %p.name, %id, addr = %p.addr, "peer joined"),
            EventKind::Restarted => {
                info!(peer = %p.name, %id, addr = %p.addr, incarnation = p.incarnation, "peer restarted")
            }
            EventKind::Failed => warn!(peer = %p.name, %id, addr = %p.addr, "peer failed"),
            EventKind::Suspect => info!(peer = %p.name, %id, addr = %p.addr, "peer suspect"),
            EventKind::Recovered => {
                info!(peer = %p.name, %id, addr = %p.addr, degraded = p.degraded(), "peer alive again")
            }
            EventKind::Left => info!(peer = %p.name, %id, addr = %p.addr, "peer left"),
            EventKind::LinkUp => info!(peer = %p.name, %id, addr = %p.addr, "link up"),
            EventKind::Updated if p.conflict.is_some() => {
                warn!(peer = %p.name, %id, addr = %p.addr, other = ?p.conflict, "two live nodes claim this name")
            }
            EventKind::Updated | EventKind::LinkDown | EventKind::Reaped => {}
        }
        state.publish(ev.kind.as_str(), || json!({ "peer": peer_json(&p, now) }));
    }
    while let Some(action) = table.poll_action() {
        match action {
            Action::Dial { id, addr } => {
                if !state.transport.dial(id, addr) {
                    table.on_dial_failed(now, id, DialFailure::Other);
                }
            }
            Action::Probe { id } => probe(table, state, id),
        }
    }
}
