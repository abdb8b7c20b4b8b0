//! The membership task: sole owner of the sans-IO peer table.
//!
//! Discovery and transport run as sibling tasks and send what they observe
//! here; this task applies it to the `PeerTable` (with `now` from tokio's
//! clock), then mirrors every change into the read-model, logs it, publishes
//! it on the event bus, and turns the table's actions into dials.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use discovery::DiscoveryEvent;
use std::collections::BTreeSet;
use std::net::SocketAddr;

use proto::addr_rule::AddrRule;
use proto::id::check_incarnation;
use proto::membership::{Action, DialFailure, EventKind, ForceLeaveError, LinkState, PeerTable};
use proto::overlay::driver::LINK_SETTLE;
use proto::overlay::Driver as OverlayDriver;
use proto::Message;
use proto::NodeId;
use serde_json::json;
use tokio::sync::{mpsc, watch};
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use transport::TransportEvent;

use crate::seeds::task::{SeedEvent, UNKNOWN};
use crate::state::{peer_json, NodeState};

fn now_std() -> std::time::Instant {
    Instant::now().into_std()
}

/// Wall-clock milliseconds, to judge incarnations (which are start times).
fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Runs until `cancel` fires or the transport's channel closes.
pub async fn run(
    mut table: PeerTable,
    state: Arc<NodeState>,
    mut disc_rx: mpsc::Receiver<DiscoveryEvent>,
    mut trans_rx: mpsc::Receiver<TransportEvent>,
    mut hooks: Hooks,
    cancel: CancellationToken,
) {
    let _stop_node_on_exit = cancel.clone().drop_guard();
    let mut commands = hooks.commands.take();
    let idle = Duration::from_secs(3600);
    let mut beacons = true;
    loop {
        let due = match (table.next_deadline(), overlay_deadline(&hooks)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let deadline = due
            .map(Instant::from_std)
            .unwrap_or_else(|| Instant::now() + idle);
        tokio::select! {
            biased;
            () = cancel.cancelled() => break,
            ev = trans_rx.recv() => match ev {
                Some(TransportEvent::Heard(heard)) => on_heard(&mut table, &state, heard),
                Some(ev) => {
                    if let Some(o) = hooks.overlay.as_mut() {
                        match &ev {
                            TransportEvent::LinkUp { hello, .. } => o.driver.on_link_up(now_std(), hello.id),
                            TransportEvent::LinkDown { id, .. } => o.driver.on_link_down(*id),
                            _ => {}
                        }
                    }
                    let id = on_transport(&mut table, &state, &hooks, ev);
                    sync(&table, &state, id);
                }
                None => break,
            },
            ev = disc_rx.recv(), if beacons => match ev {
                Some(DiscoveryEvent::Beacon {
                    at,
                    beacon,
                    interval,
                    ..
                }) => {
                    if let Err(e) = check_incarnation(beacon.incarnation, wall_ms()) {
                        if state.discovery.drops.record(at, e.reason()) {
                            warn!(peer = %beacon.name, id = %beacon.id.short(), error = %e, "beacon refused");
                        }
                        continue;
                    }
                    table.on_beacon(at, &beacon);
                    table.on_beacon_interval(beacon.id, interval, state.beacon_interval);
                    sync(&table, &state, beacon.id);
                    if let Some(o) = hooks.overlay.as_mut() {
                        // A newcomer heard by beacon takes its place in the
                        // rings (the table raises no event for it).
                        o.driver.on_beacon(beacon.id);
                    }
                }
                // No discovery (--no-multicast): links only.
                None => beacons = false,
            },
            cmd = async { commands.as_mut()?.recv().await }, if commands.is_some() => match cmd {
                Some(TableCommand::ForceLeave { id, prune, reply }) => {
                    let res = table.force_leave(now_std(), id, prune);
                    if res.is_ok() {
                        info!(id = %id.short(), prune, "peer removed by an operator");
                    }
                    let _asker_gone = reply.send(res);
                }
                None => commands = None,
            },
            () = sleep_until(deadline) => {
                // What the links heard since the last report (they report
                // once per ping round) first: a deadline is judged on the
                // latest hearing, never on a report's lag.
                on_heard(&mut table, &state, state.transport.heard());
                table.on_tick(now_std());
            }
        }
        drain(&mut table, &state, &mut hooks);
    }
}

/// Applies the links' latest hearings (a report, or a read before a tick).
fn on_heard(table: &mut PeerTable, state: &NodeState, heard: Vec<transport::Heard>) {
    for h in heard {
        match h.rtt {
            Some(rtt) => table.on_pong(h.at, h.id, rtt),
            None => table.on_traffic(h.at, h.id),
        }
        sync(table, state, h.id);
    }
}

/// When the overlay driver has something to do without an input.
fn overlay_deadline(hooks: &Hooks) -> Option<std::time::Instant> {
    hooks.overlay.as_ref()?.driver.next_deadline()
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
/// What the membership task serves besides the table.
#[derive(Debug)]
pub struct Hooks {
    /// Which advertised addresses may be dialed.
    pub rule: AddrRule,
    /// Which addresses in other nodes' membership records may be dialed:
    /// [`Hooks::rule`] plus the networks routed through the node's
    /// interfaces (a member behind a router is reachable, not on a subnet
    /// of ours).
    pub report_rule: AddrRule,
    /// The seed task, told what became of the dials it asked for.
    pub seeds: Option<mpsc::Sender<SeedEvent>>,
    /// The remembered-peers writer, given the confirmed live peers'
    /// addresses whenever they change.
    pub remember: Option<watch::Sender<BTreeSet<SocketAddr>>>,
    /// Operator commands (force-leave), from [`NodeState::table_commands`].
    pub commands: Option<mpsc::Receiver<TableCommand>>,
    /// Where the number of confirmed live members is kept for discovery,
    /// which paces its beacons and replies by it.
    pub members: Option<Arc<AtomicUsize>>,
    /// The bounded overlay (`--max-links`), or `None` for the full mesh.
    pub overlay: Option<OverlayHooks>,
}

/// What the membership task needs to keep the bounded overlay: the
/// neighbour maintenance of `proto::overlay::driver` (the simulator runs
/// the same) and the cell where a refuted incarnation is published.
#[derive(Debug)]
pub struct OverlayHooks {
    /// Ring updates, the neighbours told to the table, links to trim.
    pub driver: OverlayDriver,
    /// This node's incarnation now ([`NodeState::live_incarnation`]):
    /// discovery's beacons and the transport's handshakes read it. Only
    /// this task writes it, after the table refuted a report of our
    /// failure ([`PeerTable::local_incarnation`]).
    pub incarnation: Arc<AtomicU64>,
}

/// An operator's command for the peer table.
#[derive(Debug)]
pub enum TableCommand {
    /// Force-leave: see `PeerTable::force_leave`.
    ForceLeave {
        /// The peer.
        id: NodeId,
        /// Drop the entry rather than keep it `left`.
        prune: bool,
        /// The outcome.
        reply: tokio::sync::oneshot::Sender<Result<(), ForceLeaveError>>,
    },
}

fn on_transport(
    table: &mut PeerTable,
    state: &NodeState,
    hooks: &Hooks,
    ev: TransportEvent,
) -> NodeId {
    let rule = &hooks.rule;
    let now = now_std();
    match ev {
        TransportEvent::LinkUp {
            mut hello,
            remote,
            outbound,
        } => {
            if let (true, Some(seeds)) = (outbound, &hooks.seeds) {
                // Best effort: a full queue only delays the seed's verdict
                // to its attempt deadline.
                let _ = seeds.try_send(SeedEvent::Linked(remote));
            }
            // The address the peer advertises is what we redial: the same
            // rule as for beacons, with the connection's source as the
            // datagram's. A refused one is replaced by the source's IP
            // (with the connection's scope, for a link-local source).
            if let Err(e) = rule.check(hello.addr, remote.ip()) {
                let fixed = proto::addr_rule::scoped_like(
                    SocketAddr::new(remote.ip(), hello.addr.port()),
                    remote,
                );
                if state.transport.stats().drops.record(now, "address") {
                    warn!(peer = %hello.name, advertised = %hello.addr, using = %fixed, error = %e, "advertised address refused");
                }
                hello.addr = fixed;
            }
            // The link stays open in the transport, but the table never
            // hears of it: no entry, no event, nothing routed to it.
            match check_incarnation(hello.incarnation, wall_ms()) {
                Ok(()) => table.on_link_up(now, &hello),
                Err(e) => {
                    if state.transport.stats().drops.record(now, e.reason()) {
                        warn!(peer = %hello.name, id = %hello.id.short(), error = %e, "link refused");
                    }
                }
            }
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
            if let Some(seeds) = &hooks.seeds {
                if !table.peers().any(|p| p.link == LinkState::Up) {
                    // Best effort: a full queue means the seed task wakes
                    // anyway, and it looks at the links on every wake-up.
                    let _ = seeds.try_send(SeedEvent::Isolated);
                }
            }
            id
        }
        TransportEvent::DialFailed {
            id,
            why,
            detail,
            addr,
        } if id == UNKNOWN => {
            if let Some(seeds) = &hooks.seeds {
                // The other side's dial won: a link exists, which is all a
                // seed wants.
                let ev = if why == DialFailure::Duplicate {
                    SeedEvent::Linked(addr)
                } else {
                    SeedEvent::Failed(addr, detail)
                };
                // Best effort, as above.
                let _ = seeds.try_send(ev);
            }
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
        TransportEvent::Peers { id, mut list } => {
            // Membership records name addresses to dial: the address rule
            // applies (the reporter's own address standing for the source),
            // widened to what the node's interfaces route to.
            if let Some(reporter) = table.get(&id).map(|p| p.addr) {
                let from = reporter.ip();
                let wall = wall_ms();
                // Scope ids never cross the wire: a link-local address is
                // on the link the report came over.
                for r in &mut list.peers {
                    r.addr = proto::addr_rule::scoped_like(r.addr, reporter);
                }
                list.peers.retain(|r| {
                    // The sender's own record (a runtime tag change) names
                    // no address to dial: the link is there already.
                    let bad = r.age_ms.is_none()
                        && ((r.id != id && hooks.report_rule.check(r.addr, from).is_err())
                            || check_incarnation(r.incarnation, wall).is_err());
                    if bad && state.transport.stats().drops.record(now, "report") {
                        warn!(from = %id.short(), peer = %r.name, addr = %r.addr, "membership record refused (address or incarnation)");
                    }
                    !bad
                });
            }
            table.on_peer_list(now, id, &list);
            id
        }
        TransportEvent::Query { id, msg } => {
            table.on_traffic(now, id);
            state.queries.frame(id, msg);
            id
        }
        TransportEvent::Relay { id, msg } => {
            table.on_traffic(now, id);
            state.relay.frame(id, msg);
            id
        }
        TransportEvent::Messages { id, msgs } => {
            table.on_traffic(now, id);
            let from_name = table.get(&id).map(|p| p.name.clone());
            for msg in &msgs {
                state.deliver_message(id, from_name.as_deref(), msg);
            }
            id
        }
    }
}

/// Sends a peer list (probe or answer) off the membership loop: the
/// transport answers through its actor. Best effort: a lost probe is asked
/// again at the next probe round.
fn send_list(state: &NodeState, to: NodeId, list: proto::frame::PeerList) {
    let transport = state.transport.clone();
    tokio::spawn(async move {
        if let Err(error) = transport.try_send(to, Message::Peers(list)).await {
            debug!(to = %to.short(), %error, "peer list not sent");
        }
    });
}

/// The addresses worth remembering: every confirmed live peer's.
fn remembered(table: &PeerTable) -> BTreeSet<SocketAddr> {
    table
        .peers()
        .filter(|p| p.confirmed() && p.is_live())
        .map(|p| p.addr)
        .collect()
}

/// Mirrors table events into the read-model, logs and the bus; keeps the
/// overlay; starts dials.
fn drain(table: &mut PeerTable, state: &NodeState, hooks: &mut Hooks) {
    let now = now_std();
    let mut membership_changed = events(table, state, hooks, now);
    if let Some(o) = hooks.overlay.as_mut() {
        o.driver.poll(now, table);
        while let Some(id) = o.driver.poll_close() {
            if let Some(p) = table.get(&id) {
                debug!(peer = %p.name, id = %id.short(), "closing link: not a neighbour of either end");
            }
            if !state.transport.close_not_neighbour(id) {
                // The transport's queue is full: the link stays, and the
                // next trim looks at it again.
                o.driver
                    .on_link_up(now.checked_sub(LINK_SETTLE).unwrap_or(now), id);
            }
        }
        let c = &state.overlay;
        c.neighbours
            .store(o.driver.neighbours().len() as u64, Ordering::Relaxed);
        c.refutations.store(table.refutations(), Ordering::Relaxed);
        // A refutation raised our incarnation: later beacons and
        // handshakes carry it (both read this cell).
        if let Some(inc) = table.local_incarnation() {
            if o.incarnation.fetch_max(inc, Ordering::Relaxed) < inc {
                info!(
                    incarnation = inc,
                    "reported failed: refuted with a higher incarnation"
                );
            }
        }
        // Telling the table its neighbours may have raised events.
        membership_changed |= events(table, state, hooks, now);
    }
    after_events(table, hooks, membership_changed);
    while let Some(action) = table.poll_action() {
        match action {
            Action::Dial { id, addr } => {
                if !state.transport.dial(id, addr) {
                    table.on_dial_failed(now, id, DialFailure::Other);
                }
            }
            Action::Send { to, list } => send_list(state, to, list),
        }
    }
}

/// Mirrors the table's pending events into the read-model, logs, the bus
/// and the overlay driver; says whether membership changed.
fn events(
    table: &mut PeerTable,
    state: &NodeState,
    hooks: &mut Hooks,
    now: std::time::Instant,
) -> bool {
    let c = &state.table;
    c.pending.store(table.pending() as u64, Ordering::Relaxed);
    c.admitted.store(table.admitted(), Ordering::Relaxed);
    c.refused.store(table.refused_pending(), Ordering::Relaxed);
    c.stalls.store(table.stalls(), Ordering::Relaxed);
    if let Ok(mut names) = c.unlinked.try_lock() {
        // Only the API reads it, briefly; a busy lock is retried next time.
        if names.as_slice() != table.unlinked() {
            names.clear();
            names.extend_from_slice(table.unlinked());
        }
    }
    let mut membership_changed = false;
    while let Some(ev) = table.poll_event() {
        if let Some(o) = hooks.overlay.as_mut() {
            o.driver.on_event(&ev);
        }
        membership_changed |= !matches!(
            ev.kind,
            EventKind::LinkUp | EventKind::LinkDown | EventKind::Suspect | EventKind::Recovered
        );
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
            EventKind::LinkUp => {
                info!(peer = %p.name, %id, addr = %p.addr, "link up");
                // Its handshake carried our start-time tags: a runtime
                // change since then follows at once.
                if state.tags.versioned().1 > 0 {
                    state.send_self_record(vec![p.id]);
                }
            }
            EventKind::Updated if p.conflict.is_some() => {
                warn!(peer = %p.name, %id, addr = %p.addr, other = ?p.conflict, "two live nodes claim this name")
            }
            EventKind::Updated | EventKind::LinkDown | EventKind::Reaped => {}
        }
        state.publish(ev.kind.as_str(), || json!({ "peer": peer_json(&p, now) }));
    }
    membership_changed
}

/// What follows a change of membership: discovery's pacing count and the
/// remembered peers.
fn after_events(table: &PeerTable, hooks: &Hooks, membership_changed: bool) {
    if let (true, Some(members)) = (membership_changed, &hooks.members) {
        // Only on a change of membership: a scan of the table, not one per
        // event.
        let live = table
            .peers()
            .filter(|p| p.confirmed() && p.is_live())
            .count();
        members.store(live, Ordering::Relaxed);
    }
    if let (true, Some(remember)) = (membership_changed, &hooks.remember) {
        let set = remembered(table);
        remember.send_if_modified(|old| {
            let changed = *old != set;
            if changed {
                *old = set;
            }
            changed
        });
    }
}
