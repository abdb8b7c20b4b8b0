//! The benchmark scenarios: each starts a fresh cluster from cold, waits
//! for it to converge, applies one disturbance, and measures, all in
//! virtual time from the tables' own events. Each returns a [`Report`]
//! (one JSON object).
//!
//! | scenario | disturbance | figures |
//! |---|---|---|
//! | `converge` | none | `one_table_ms` (every table lists every node, confirmed and live), `converge_ms` (and all alive with links up), idle messages per node per second |
//! | `crash` | `kill -9` of one node | `crash_seen_by_all_ms` (every other live table has it `failed`) |
//! | `leave` | graceful stop of one node | `leave_seen_by_all_ms` (`left` everywhere) |
//! | `silent` | one node cut off (partition of one) for `partition_for` | `silent_loss_ms` (all others have it `failed`), `isolated_sees_all_failed_ms`, `heal_one_table_ms`, `heal_ms` |
//! | `partition` | a random 50/50 split for `partition_for` | `split_seen_ms` (each side has the other `failed`), `heal_one_table_ms` (everyone lists everyone live again), `heal_ms` (and all alive with links up) |
//! | `pause` | `SIGSTOP` of one node for `pause_for` | `woken_false_failures` (verdicts of the woken node about running peers), `paused_seen_failed_ms`, `recovery_ms` |
//! | `restart` | `kill -9`, then a new process on the same host 500 ms later | `restart_ms` (every table has the new id alive with link up) |
//! | `overlay` | cold start, then a crash, a broadcast, a leave and a silent loss, one after the other | `one_table_ms`, `crash_known_by_all_ms`, `broadcast_reaches_all_ms` (the last delivery of one broadcast relayed over the overlay) and `broadcast_copies_per_node`, `leave_seen_by_all_ms`, `silent_loss_ms`, `heal_one_table_ms` |
//!
//! The disturbance comes two `settle` periods after every table first
//! lists every node (`one_table_ms`); `converge_ms` is measured alongside.
//! Every report also carries the false verdicts over the whole run, the
//! messages per node per second, and the wall time the run took.

use std::time::{Duration, Instant};

use proto::membership::EventKind;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::{json, Map, Value};

use crate::config::SimConfig;
use crate::net::Sent;
use crate::observe::{FalseVerdict, Observer};
use crate::world::{Op, World};

/// Every scenario, in the order `all` runs them.
pub const SCENARIOS: &[&str] = &[
    "converge",
    "crash",
    "leave",
    "silent",
    "partition",
    "pause",
    "restart",
];

/// What a scenario runs with.
#[derive(Debug, Clone)]
pub struct Params {
    /// The world.
    pub cfg: SimConfig,
    /// Virtual length of the whole run.
    pub seconds: Duration,
    /// How long partitions last.
    pub partition_for: Duration,
    /// How long the paused node stays paused.
    pub pause_for: Duration,
    /// Start times of the cold start are spread over this.
    pub start_spread: Duration,
    /// Time between convergence and the disturbance.
    pub settle: Duration,
}

impl Params {
    /// Defaults around `cfg`: a run of `seconds`.
    pub fn new(cfg: SimConfig, seconds: Duration) -> Params {
        Params {
            cfg,
            seconds,
            partition_for: Duration::from_secs(5),
            pause_for: Duration::from_secs(3),
            start_spread: Duration::from_millis(1),
            settle: Duration::from_secs(1),
        }
    }
}

/// One scenario's figures.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The scenario.
    pub scenario: String,
    /// Hosts.
    pub nodes: usize,
    /// The seed.
    pub seed: u64,
    /// Packet loss probability.
    pub loss: f64,
    /// Mean one-way latency.
    pub latency_ms: f64,
    /// Latency jitter (±).
    pub jitter_ms: f64,
    /// Links in the cluster-secret mode.
    pub secured: bool,
    /// Cold start until converged, virtual milliseconds (`null`: not
    /// within the run).
    pub converge_ms: Option<f64>,
    /// The scenario's own figures.
    #[serde(flatten)]
    pub figures: Map<String, Value>,
    /// `failed` verdicts about live, running, reachable nodes.
    pub false_failures: usize,
    /// The first few false failures: when, by whom, about whom.
    pub first_false_failures: Vec<FalseVerdict>,
    /// `suspect` verdicts about live, running, reachable nodes.
    pub false_suspicions: usize,
    /// Every message sent, per node per virtual second.
    pub msgs_per_node_per_s: f64,
    /// The same from `settle` after convergence until the disturbance (or
    /// the end): the idle cost.
    pub idle_msgs_per_node_per_s: Option<f64>,
    /// What was sent, by kind, all nodes.
    pub sent: Sent,
    /// Peer-table inputs per node per virtual second.
    pub table_inputs_per_node_per_s: f64,
    /// Ticks after which a table asked to be woken at once again.
    pub tick_spins: u64,
    /// Inbound connections dropped for too many handshakes in progress.
    pub handshake_backlog: u64,
    /// Beacons refused by the new-peer budget.
    pub new_peer_budget_refusals: u64,
    /// Virtual seconds simulated.
    pub virtual_s: f64,
    /// Wall-clock milliseconds the run took.
    pub wall_ms: f64,
    /// Simulator events processed.
    pub events: u64,
    /// The trace's hash (equal for equal seeds).
    pub trace_hash: String,
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// Runs the scenario `name`.
pub fn run(name: &str, p: &Params) -> Option<Report> {
    let wall = Instant::now();
    let mut w = World::new(p.cfg.clone());
    let t0 = w.now();
    let end = t0 + p.seconds;
    // The scenario's own choices come from a generator of their own, so
    // that they never shift the world's random stream.
    let mut pick = StdRng::seed_from_u64(p.cfg.seed ^ 0x5eed_5ce0);
    let mut figures = Map::new();
    w.apply(&Op::StartAll {
        spread: p.start_spread,
    });
    let n = p.cfg.nodes as u64;
    let one = w.run_until(end, |w| {
        w.observer().live() == n && w.observer().one_table()
    });
    figures.insert("one_table_ms".into(), json!(one.map(|t| ms(t - t0))));
    let strict = |w: &World| w.observer().live() == n && w.observer().converged();
    let mut converged = None;
    let mut idle = None;
    if let Some(one) = one {
        // The idle window starts `settle` after every table lists every
        // node; the disturbance follows it. Under loss "all alive with
        // links up at once" may never hold on a large cluster (some link
        // is always stalled), so it is measured on the side, not waited for.
        let from = (one + p.settle).min(end);
        converged = w.run_until(from, strict);
        w.run_until(from, |_| false);
        let sent0 = w.sent_total().total();
        let idle_until = (from + p.settle).min(end);
        if converged.is_none() {
            converged = w.run_until(idle_until, strict);
        }
        w.run_until(idle_until, |_| false);
        let secs = (idle_until - from).as_secs_f64();
        if secs > 0.0 {
            let sent = w.sent_total().total() - sent0;
            idle = Some(sent as f64 / n as f64 / secs);
        }
        disturb(name, p, &mut w, &mut pick, end, &mut figures)?;
    } else if name != "converge" {
        figures.insert("error".into(), json!("no single table within the run"));
    }
    if converged.is_none() && name == "converge" {
        converged = w.run_until(end, strict);
    }
    let converge = converged.map(|t| t - t0);
    w.run_until(end, |_| false);
    Some(report(name, p, &w, converge, idle, figures, wall))
}

fn disturb(
    name: &str,
    p: &Params,
    w: &mut World,
    pick: &mut StdRng,
    end: Instant,
    figures: &mut Map<String, Value>,
) -> Option<()> {
    let n = p.cfg.nodes as u32;
    let victim = pick.gen_range(0..n);
    let others = |w: &World, but: u32| -> Vec<proto::NodeId> {
        (0..n)
            .filter(|s| *s != but)
            .filter_map(|s| w.observer().id(s))
            .collect()
    };
    let now = w.now();
    match name {
        "converge" => {}
        "crash" | "leave" => {
            let id = w.observer().id(victim)?;
            let kind = if name == "crash" {
                EventKind::Failed
            } else {
                EventKind::Left
            };
            let observers = others(w, victim);
            let watch = w.observer_mut().watch(kind, now, [id], observers);
            w.apply(&if name == "crash" {
                Op::Crash(victim)
            } else {
                Op::Leave(victim)
            });
            w.run_until(end, |w| w.observer().seen_by_all(watch).is_some());
            let key = format!("{name}_seen_by_all_ms");
            figures.insert(key, json!(w.observer().seen_by_all(watch).map(ms)));
        }
        "silent" | "partition" => {
            let (a, b): (Vec<u32>, Vec<u32>) = if name == "silent" {
                ((0..n).filter(|s| *s != victim).collect(), vec![victim])
            } else {
                let mut all: Vec<u32> = (0..n).collect();
                all.shuffle(pick);
                let b = all.split_off(all.len() / 2);
                (all, b)
            };
            let ids = |w: &World, side: &[u32]| -> Vec<proto::NodeId> {
                side.iter().filter_map(|s| w.observer().id(*s)).collect()
            };
            let (ia, ib) = (ids(w, &a), ids(w, &b));
            let a_sees_b = w
                .observer_mut()
                .watch(EventKind::Failed, now, ib.clone(), ia.clone());
            let b_sees_a = w.observer_mut().watch(EventKind::Failed, now, ia, ib);
            w.apply(&Op::Partition(vec![a, b]));
            let heal_at = (now + p.partition_for).min(end);
            w.run_until(heal_at, |_| false);
            let (ab, ba) = (
                w.observer().seen_by_all(a_sees_b),
                w.observer().seen_by_all(b_sees_a),
            );
            if name == "silent" {
                figures.insert("silent_loss_ms".into(), json!(ab.map(ms)));
                figures.insert("isolated_sees_all_failed_ms".into(), json!(ba.map(ms)));
            } else {
                let both = ab.zip(ba).map(|(x, y)| ms(x.max(y)));
                figures.insert("split_seen_ms".into(), json!(both));
            }
            figures.insert("partition_ms".into(), json!(ms(heal_at - now)));
            w.apply(&Op::Heal);
            let healed = w.now();
            let one = w.run_until(end, |w| w.observer().one_table());
            figures.insert(
                "heal_one_table_ms".into(),
                json!(one.map(|t| ms(t - healed))),
            );
            let back = w.run_until(end, |w| w.observer().converged());
            figures.insert("heal_ms".into(), json!(back.map(|t| ms(t - healed))));
        }
        "pause" => {
            let id = w.observer().id(victim)?;
            let observers = others(w, victim);
            let seen = w
                .observer_mut()
                .watch(EventKind::Failed, now, [id], observers);
            w.apply(&Op::Pause(victim));
            w.run_until((now + p.pause_for).min(end), |_| false);
            let before = w
                .observer()
                .false_verdicts()
                .iter()
                .filter(|v| v.judge == victim && v.kind == EventKind::Failed.as_str())
                .count();
            w.apply(&Op::Resume(victim));
            let resumed = w.now();
            let back = w.run_until(end, |w| w.observer().converged());
            // What the woken node decided about peers that kept running.
            let settle_until = (w.now() + p.cfg.flags.dead_after * 2).min(end);
            w.run_until(settle_until, |_| false);
            let woken = w
                .observer()
                .false_verdicts()
                .iter()
                .filter(|v| v.judge == victim && v.kind == EventKind::Failed.as_str())
                .count()
                - before;
            figures.insert("pause_ms".into(), json!(ms(resumed - now)));
            figures.insert("woken_false_failures".into(), json!(woken));
            figures.insert(
                "paused_seen_failed_ms".into(),
                json!(w.observer().seen_by_all(seen).map(ms)),
            );
            figures.insert("recovery_ms".into(), json!(back.map(|t| ms(t - resumed))));
            let stalls = w.node(victim).map_or(0, |n| n.table.stalls());
            figures.insert("woken_stalls".into(), json!(stalls));
        }
        "restart" => {
            w.apply(&Op::Crash(victim));
            w.run_until((now + Duration::from_millis(500)).min(end), |_| false);
            w.apply(&Op::Start(victim));
            let started = w.now();
            let back = w.run_until(end, |w| w.observer().converged());
            figures.insert("restart_ms".into(), json!(back.map(|t| ms(t - started))));
        }
        other => {
            figures.insert("error".into(), json!(format!("unknown scenario {other}")));
        }
    }
    Some(())
}

fn report(
    name: &str,
    p: &Params,
    w: &World,
    converge: Option<Duration>,
    idle: Option<f64>,
    figures: Map<String, Value>,
    wall: Instant,
) -> Report {
    let n = p.cfg.nodes as f64;
    let secs = w.elapsed().as_secs_f64().max(1e-9);
    let sent = w.sent_total();
    let stats = w.stats();
    let obs = w.observer();
    Report {
        scenario: name.into(),
        nodes: p.cfg.nodes,
        seed: p.cfg.seed,
        loss: p.cfg.loss,
        latency_ms: ms(p.cfg.latency),
        jitter_ms: ms(p.cfg.jitter),
        secured: p.cfg.secured,
        converge_ms: converge.map(ms),
        figures,
        false_failures: obs.false_failures(),
        first_false_failures: first_false_failures(obs),
        false_suspicions: obs.false_suspicions(),
        msgs_per_node_per_s: (sent.total() as f64 / n / secs * 10.0).round() / 10.0,
        idle_msgs_per_node_per_s: idle.map(|x| (x * 10.0).round() / 10.0),
        sent,
        table_inputs_per_node_per_s: (stats.table_inputs as f64 / n / secs * 10.0).round() / 10.0,
        tick_spins: stats.tick_spins,
        handshake_backlog: stats.handshake_backlog,
        new_peer_budget_refusals: stats.new_peer_budget,
        virtual_s: secs,
        wall_ms: (wall.elapsed().as_secs_f64() * 1e4).round() / 10.0,
        events: w.processed(),
        trace_hash: format!("{:016x}", obs.trace_hash()),
    }
}

/// Virtual time between two checks of the overlay scenario's conditions
/// (each looks at every table: too costly after every event).
const OVERLAY_POLL: Duration = Duration::from_millis(5);

/// Runs `w` until `done` holds, checking every [`OVERLAY_POLL`]; returns
/// the instant of the first check at which it held.
fn poll_until(w: &mut World, end: Instant, done: impl Fn(&World) -> bool) -> Option<Instant> {
    loop {
        if done(w) {
            return Some(w.now());
        }
        if w.now() >= end {
            return None;
        }
        let next = (w.now() + OVERLAY_POLL).min(end);
        w.run_until(next, |_| false);
    }
}

/// Per running node: (links, live entries about running nodes, confirmed
/// live entries about running nodes).
fn overlay_counts(w: &World, n: u32) -> Vec<(usize, usize, usize)> {
    let running: std::collections::HashSet<proto::NodeId> = w.live_ids().into_iter().collect();
    (0..n)
        .filter_map(|s| w.node(s))
        .map(|node| {
            let live = node
                .table
                .peers()
                .filter(|p| p.is_live() && running.contains(&p.id));
            let (mut known, mut confirmed) = (0, 0);
            for p in live {
                known += 1;
                confirmed += usize::from(p.confirmed());
            }
            (node.links(), known, confirmed)
        })
        .collect()
}

/// The first false failures (at most 8), so that a run that has some says
/// where to look.
fn first_false_failures(obs: &Observer) -> Vec<FalseVerdict> {
    obs.false_verdicts()
        .iter()
        .filter(|v| v.kind == EventKind::Failed.as_str())
        .take(8)
        .cloned()
        .collect()
}

/// Min, mean and max of `v`, as JSON.
fn spread(v: impl Iterator<Item = usize>) -> Value {
    let v: Vec<usize> = v.collect();
    let sum: usize = v.iter().sum();
    json!({
        "min": v.iter().min(),
        "mean": (!v.is_empty()).then(|| (sum as f64 / v.len() as f64 * 10.0).round() / 10.0),
        "max": v.iter().max(),
    })
}

/// The `overlay` scenario (`--max-links K`, run by name only): a cold start
/// in which each node links only to its `proto::overlay` neighbours, then
/// one `kill -9`, one graceful leave and one silent loss (a partition of
/// one for `partition_for`, then healed), each of a different node.
/// Membership must reach every node without a full mesh: `all_known_ms`
/// (every table has an entry, confirmed or not, for every node),
/// `one_table_ms` (every table lists every node confirmed and live),
/// `crash_seen_by_all_ms`, `leave_seen_by_all_ms`, `silent_loss_ms` (every
/// other table emitted the verdict), `heal_one_table_ms`, and the degree
/// (`links`) and message rates: over the whole run, and in the idle window
/// (from `idle_from_ms`, one `settle` long) both in all and by kind
/// (`idle_sent_per_node_per_s`), so that a change in the idle cost can be
/// traced to the frames that carry it, and the membership records those
/// frames carried (`records_per_node` over the run,
/// `idle_records_per_node_per_s` and `…_by_kind` in the idle window: a view
/// is hundreds of `alive` records in a frame, a relay a few). `rate_limited`,
/// `new_peer_budget_refusals` and `refused_pending` count what discovery's
/// and the table's bounds turned away.
pub fn overlay(p: &Params) -> Value {
    let wall = Instant::now();
    let mut w = World::new(p.cfg.clone());
    let t0 = w.now();
    let end = t0 + p.seconds;
    let n = p.cfg.nodes as u32;
    let k = p.cfg.max_links.unwrap_or(usize::MAX);
    let full = k.min(n as usize - 1);
    let mut pick = StdRng::seed_from_u64(p.cfg.seed ^ 0x5eed_5ce0);
    w.apply(&Op::StartAll {
        spread: p.start_spread,
    });
    // Stops at the first node that misses someone (most checks fail fast).
    let all_known = |w: &World| {
        let running: std::collections::HashSet<proto::NodeId> = w.live_ids().into_iter().collect();
        running.len() == n as usize
            && (0..n).filter_map(|s| w.node(s)).all(|node| {
                node.table
                    .peers()
                    .filter(|p| p.is_live() && running.contains(&p.id))
                    .count()
                    == n as usize - 1
            })
    };
    // Half the run at most for the cold start, so that the crash happens.
    let cold_end = (t0 + p.seconds / 2).min(end);
    let one = w.run_until(cold_end, |w| {
        w.observer().live() == u64::from(n) && w.observer().one_table()
    });
    let known = poll_until(&mut w, cold_end, all_known);
    let linked = poll_until(&mut w, cold_end, |w| {
        w.live_ids().len() == n as usize
            && (0..n)
                .filter_map(|s| w.node(s))
                .all(|node| node.links() >= full)
    });
    w.run_until((w.now() + p.settle).min(end), |_| false);
    let sent0 = w.sent_total();
    let records0 = w.records_sent();
    let idle_from = w.now();
    w.run_until((idle_from + p.settle).min(end), |_| false);
    let idle_s = (w.now() - idle_from).as_secs_f64();
    let idle_sent = w.sent_total().since(&sent0);
    let idle = (idle_s > 0.0).then(|| idle_sent.total() as f64 / f64::from(n) / idle_s);
    let counts = overlay_counts(&w, n);
    let mut out = json!({
        "scenario": "overlay",
        "nodes": n,
        "max_links": p.cfg.max_links,
        "seed": p.cfg.seed,
        "loss": p.cfg.loss,
        "all_known_ms": known.map(|t| ms(t - t0)),
        "one_table_ms": one.map(|t| ms(t - t0)),
        "all_linked_ms": linked.map(|t| ms(t - t0)),
        "links": spread(counts.iter().map(|c| c.0)),
        "known": spread(counts.iter().map(|c| c.1)),
        "confirmed": spread(counts.iter().map(|c| c.2)),
        "idle_msgs_per_node_per_s": idle,
        "idle_sent_per_node_per_s": (idle_s > 0.0).then(|| idle_sent.rates(f64::from(n) * idle_s)),
        "idle_from_ms": ms(idle_from - t0),
        // Records per `peers` frame tell views (hundreds) from relays (a few).
        "idle_records_per_node_per_s": (idle_s > 0.0)
            .then(|| (w.records_sent().total() - records0.total()) as f64 / f64::from(n) / idle_s),
        "idle_records_per_node_per_s_by_kind": (idle_s > 0.0)
            .then(|| w.records_sent().rates_since(&records0, f64::from(n) * idle_s)),
    });
    // One crash: its neighbours see it at once (reset, refused redial);
    // everyone else only when its entry falls silent.
    let victim = pick.gen_range(0..n);
    if let Some(id) = w.observer().id(victim) {
        let watchers: Vec<u32> = (0..n)
            .filter(|&s| {
                w.node(s)
                    .is_some_and(|node| node.linked().any(|l| *l == id))
            })
            .collect();
        let crashed = w.now();
        let others: Vec<proto::NodeId> = (0..n)
            .filter(|&s| s != victim)
            .filter_map(|s| w.observer().id(s))
            .collect();
        let watch = w
            .observer_mut()
            .watch(EventKind::Failed, crashed, [id], others);
        w.apply(&Op::Crash(victim));
        let not_live = |w: &World, s: u32| {
            w.node(s)
                .is_none_or(|node| node.table.get(&id).is_none_or(|p| !p.is_live()))
        };
        let by_neighbours = poll_until(&mut w, end, |w| watchers.iter().all(|&s| not_live(w, s)));
        let by_all = poll_until(&mut w, end, |w| (0..n).all(|s| not_live(w, s)));
        let repaired = poll_until(&mut w, end, |w| {
            (0..n)
                .filter_map(|s| w.node(s))
                .all(|node| node.links() >= full.min(n as usize - 2))
        });
        let seen = w.observer().seen_by_all(watch);
        out["crash_seen_by_all_ms"] = json!(seen.map(ms));
        out["crash_neighbours"] = json!(watchers.len());
        out["crash_seen_by_neighbours_ms"] = json!(by_neighbours.map(|t| ms(t - crashed)));
        out["crash_known_by_all_ms"] = json!(by_all.map(|t| ms(t - crashed)));
        out["repaired_ms"] = json!(repaired.map(|t| ms(t - crashed)));
    }
    // One broadcast from a running node: when has every other running node
    // delivered it (relayed over the overlay), and what did it cost.
    w.run_until((w.now() + p.settle).min(end), |_| false);
    let from = loop {
        let s = pick.gen_range(0..n);
        if w.node(s).is_some() {
            break s;
        }
    };
    let forwarded = |w: &World| -> u64 {
        (0..n)
            .filter_map(|s| w.node(s))
            .map(|node| node.flood_stats().forwarded)
            .sum()
    };
    let before = forwarded(&w);
    let sent = w.now();
    if let Some((origin, seq)) = w.broadcast(from) {
        let all = |w: &World| {
            (0..n)
                .filter(|&s| s != from)
                .filter_map(|s| w.node(s))
                .all(|node| node.delivered(origin, seq).is_some())
        };
        // Timed by the deliveries' own instants, not by the poll.
        let reached = poll_until(&mut w, (sent + p.settle).min(end), all).map(|_| {
            (0..n)
                .filter_map(|s| w.node(s)?.delivered(origin, seq))
                .max()
                .unwrap_or(sent)
        });
        out["broadcast_reaches_all_ms"] = json!(reached.map(|t| ms(t - sent)));
        out["broadcast_copies_per_node"] = json!((forwarded(&w) - before) as f64 / f64::from(n));
    }
    // A graceful leave, then a silent loss, of two other running nodes.
    let running = |w: &World, pick: &mut StdRng| loop {
        let s = pick.gen_range(0..n);
        if w.node(s).is_some() {
            break s;
        }
    };
    w.run_until((w.now() + p.settle).min(end), |_| false);
    let leaver = running(&w, &mut pick);
    let mut silent = running(&w, &mut pick);
    while silent == leaver {
        silent = running(&w, &mut pick);
    }
    let watch_all = |w: &mut World, kind: EventKind, who: u32| {
        let id = w.observer().id(who)?;
        let others: Vec<proto::NodeId> = (0..n)
            .filter(|&s| s != who && w.node(s).is_some())
            .filter_map(|s| w.observer().id(s))
            .collect();
        let now = w.now();
        Some(w.observer_mut().watch(kind, now, [id], others))
    };
    if let Some(watch) = watch_all(&mut w, EventKind::Left, leaver) {
        w.apply(&Op::Leave(leaver));
        let until = (w.now() + p.settle).min(end);
        poll_until(&mut w, until, |w| w.observer().seen_by_all(watch).is_some());
        out["leave_seen_by_all_ms"] = json!(w.observer().seen_by_all(watch).map(ms));
    }
    w.run_until((w.now() + p.settle).min(end), |_| false);
    if let Some(watch) = watch_all(&mut w, EventKind::Failed, silent) {
        let rest: Vec<u32> = (0..n).filter(|&s| s != silent).collect();
        let cut = w.now();
        w.apply(&Op::Partition(vec![vec![silent], rest]));
        w.run_until((cut + p.partition_for).min(end), |_| false);
        out["silent_loss_ms"] = json!(w.observer().seen_by_all(watch).map(ms));
        w.apply(&Op::Heal);
        let healed = w.now();
        let back = w.run_until(end, |w| w.observer().one_table());
        out["heal_one_table_ms"] = json!(back.map(|t| ms(t - healed)));
    }
    w.run_until(end, |_| false);
    let counts = overlay_counts(&w, n);
    out["links_at_end"] = spread(counts.iter().map(|c| c.0));
    let stats = w.stats();
    out["rate_limited"] = json!(stats.rate_limited);
    out["new_peer_budget_refusals"] = json!(stats.new_peer_budget);
    out["refused_pending"] = json!((0..n)
        .filter_map(|s| w.node(s))
        .map(|node| node.table.refused_pending())
        .sum::<u64>());
    out["false_failures"] = json!(w.observer().false_failures());
    out["first_false_failures"] = json!(first_false_failures(w.observer()));
    out["false_suspicions"] = json!(w.observer().false_suspicions());
    out["sent"] = json!(w.sent_total());
    out["msgs_per_node_per_s"] =
        json!(w.sent_total().total() as f64 / f64::from(n) / p.seconds.as_secs_f64());
    out["records_per_node"] = json!(w.records_sent().total() as f64 / f64::from(n));
    out["trace_hash"] = json!(format!("{:016x}", w.observer().trace_hash()));
    out["virtual_s"] = json!(p.seconds.as_secs_f64());
    out["wall_ms"] = json!((wall.elapsed().as_secs_f64() * 1e4).round() / 10.0);
    out
}
