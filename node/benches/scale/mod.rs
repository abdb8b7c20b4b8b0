//! Figures against cluster size: `--sizes 16,64,128,256` with every node run
//! as `--max-links K` (8 by default, as the daemon; 0 is the full mesh), the full mesh
//! beside it at `--mesh-sizes`, and Serf at `--serf-sizes`, all in one run.
//!
//! "Seen by all" means that every node's *table* says it: a `peer_joined`
//! (or `link_up`), `peer_left` or `peer_failed` event on each node's own
//! event stream, timed by the node's own `at`, not a link to everyone. The
//! harness holds one event subscription per node for the cluster's life and
//! polls at most one socket (a newcomer's) at a time: at 256 nodes on two
//! cores the harness is load too. Per size N:
//!
//! - `converge`: N processes spawned in one go (multicast, a group of their
//!   own): from the first spawn until the last node's table lists all N - 1
//!   others alive (what happened before a node's subscription, from its peer
//!   list's `since_ms`). Baseline: the spawning alone. The last of these
//!   clusters stays up for the figures below.
//! - `join`: a newcomer into the N-node cluster: from its spawn until every
//!   one of the N lists it and its own links are up to as many peers as it
//!   wants (`overlay.neighbours` in `/v1/self`; N in a full mesh): the latest
//!   of those nodes' timestamps. Baseline: `constellationd --version`.
//! - `graceful_leave`: that newcomer's SIGTERM until all N list it `left`.
//! - `crash_detection`: another newcomer, `kill -9`, until all N list it
//!   `failed`. Baseline for both: `latency` of a unicast is not measured here
//!   (a non-neighbour has no link), so none.
//! - `silent_loss`: a newcomer run as user `nobody` whose every packet on lo
//!   is dropped (see `MuteNobody`), until all N list it `failed`. Root and
//!   iptables only.
//! - `broadcast`: `POST /v1/messages` with `to: null` on one node of the
//!   N-node cluster, until the last of the other N - 1 emitted it on its
//!   event stream (its own `at`): relayed over the overlay. Baseline: a
//!   unicast to one of its neighbours.
//! - `peers_query`: whole-process `constellationd peers --json` against one
//!   node. Baseline: `curl --unix-socket` of the same URL.
//! - `idle`: per node over a window: CPU (`/proc/PID/task/*/schedstat`
//!   run time, all threads), wake-ups per second (the same file's count of
//!   times each thread was scheduled in), loopback bytes per second net of
//!   the rate before the cluster started (lo is shared with anything else
//!   on the host), USS and RSS.
//!
//! Every line carries `suite: "scale"`, `system`, `max_links` and the
//! 1-minute load average (`load1`) when it was printed.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use http_body_util::BodyExt;
use hyper::Method;
use node::client::Client;
use proto::control::PeerList;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::{
    at, idle_cost, lo_bytes, ms_since, serf, spawn, spawn_wrapped, stats, subscribe,
    whole_process_ms, Cluster, MuteNobody, AS_NOBODY, BIN,
};

/// What `--sizes`, `--max-links` and friends asked for.
#[derive(Clone)]
pub struct Opts {
    /// Sizes for constellationd with `--max-links max_links`.
    pub sizes: Vec<usize>,
    /// `--max-links` of every node in `sizes` (0: the full mesh; the
    /// daemon's default when not given).
    pub max_links: usize,
    /// Sizes for the full mesh beside it (none when `max_links` is 0).
    pub mesh_sizes: Vec<usize>,
    /// Sizes for Serf (when `SERF_BIN` is set).
    pub serf_sizes: Vec<usize>,
    /// Runs per figure (median reported).
    pub runs: usize,
    /// Idle measurement window.
    pub idle: Duration,
    /// `--only`: the figures to measure (all when `None`).
    pub only: Option<Vec<String>>,
}

impl Opts {
    /// Parses the suite's flags from `args`; `None` without `--sizes`.
    pub fn parse(args: &[String], quick: bool) -> Option<Opts> {
        let list = |flag: &str| -> Option<Vec<usize>> {
            let i = args.iter().position(|a| a == flag)?;
            let v = args.get(i + 1)?;
            Some(
                v.split(',')
                    .filter(|s| !s.is_empty())
                    .map(|s| {
                        s.parse()
                            .unwrap_or_else(|_| panic!("{flag}: {s:?} is no size"))
                    })
                    .collect(),
            )
        };
        let sizes = list("--sizes")?;
        let max_links = list("--max-links")
            .and_then(|v| v.first().copied())
            .unwrap_or(node::config::DEFAULT_MAX_LINKS as usize);
        let mesh_sizes = if max_links == 0 {
            Vec::new()
        } else {
            list("--mesh-sizes").unwrap_or_default()
        };
        let serf_sizes = list("--serf-sizes")
            .unwrap_or_else(|| sizes.iter().copied().filter(|&n| n <= 128).collect());
        let runs = list("--runs")
            .and_then(|v| v.first().copied())
            .unwrap_or(if quick { 3 } else { 5 })
            .max(1);
        let idle = Duration::from_secs(if quick { 5 } else { 20 });
        let only = args
            .iter()
            .position(|a| a == "--only")
            .and_then(|i| args.get(i + 1))
            .map(|v| v.split(',').map(String::from).collect());
        Some(Opts {
            only,
            sizes,
            max_links,
            mesh_sizes,
            serf_sizes,
            runs,
            idle,
        })
    }
}

impl Opts {
    /// Whether figure `name` was asked for.
    fn want(&self, name: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|o| o.iter().any(|x| x == name))
    }
}

/// Runs the suite: every size, smallest first; at each, constellationd
/// with `--max-links`, then the full mesh, then Serf (those asked for). A
/// size whose cluster broke down (a wait past its deadline) prints a
/// `failed` line with the reason and the run goes on with the next.
pub async fn run(o: &Opts) {
    let all: BTreeSet<usize> = o
        .sizes
        .iter()
        .chain(&o.mesh_sizes)
        .chain(&o.serf_sizes)
        .copied()
        .collect();
    for n in all {
        let mut systems = Vec::new();
        if o.sizes.contains(&n) {
            systems.push(("constellationd", o.max_links));
        }
        if o.mesh_sizes.contains(&n) {
            systems.push(("constellationd", 0));
        }
        for (system, k) in systems {
            let o = o.clone();
            // A panic (a deadline passed) ends this task, whose drop stops
            // its processes; the next system or size starts clean.
            if let Err(e) = tokio::spawn(async move { ours(n, k, &o).await }).await {
                failed(system, n, k, e);
            }
        }
        if let (true, Some(bin)) = (o.serf_sizes.contains(&n), serf::bin()) {
            let o = o.clone();
            if let Err(e) = tokio::task::spawn_blocking(move || theirs(&bin, n, &o)).await {
                failed("serf", n, 0, e);
            }
        }
    }
}

/// The line that says a size did not complete, and why.
fn failed(system: &str, n: usize, k: usize, e: tokio::task::JoinError) {
    let why = match e.try_into_panic() {
        Ok(p) => p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default(),
        Err(e) => e.to_string(),
    };
    let why: String = why.chars().take(300).collect();
    println!(
        "{}",
        json!({"bench": "size", "suite": "scale", "system": system, "n": n, "max_links": k,
               "failed": why, "load1": load1()})
    );
}

/// The 1-minute load average now.
pub fn load1() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse().ok())
        .unwrap_or(-1.0)
}

/// One JSON line: median, min and max of `xs` (ms), and a baseline's
/// median when there is one.
fn emit(bench: &str, n: usize, system: &str, k: usize, xs: &[f64], base: Option<(&str, &[f64])>) {
    if xs.is_empty() {
        return;
    }
    let (med, min, max) = stats(xs.to_vec());
    let mut line = json!({
        "bench": bench, "suite": "scale", "system": system, "n": n, "max_links": k,
        "runs": xs.len(), "median_ms": r3(med), "min_ms": r3(min), "max_ms": r3(max),
        "load1": load1(),
    });
    if let Some((name, b)) = base.filter(|(_, b)| !b.is_empty()) {
        let bmed = stats(b.to_vec()).0;
        line["baseline"] = json!(name);
        line["baseline_median_ms"] = json!(r3(bmed));
        line["ratio_to_baseline"] = json!(r3(med / bmed));
    }
    println!("{line}");
}

fn r3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// A fresh cluster directory with `--max-links k` for every node (0: the
/// full mesh) and a multicast group of its own.
fn cluster_dir(tag: &str, k: usize) -> (PathBuf, String) {
    let dir = std::env::temp_dir().join(format!("cst-scale-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    {
        // A silent-loss victim runs as `nobody` and makes its socket here.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    }
    std::fs::write(dir.join("extra.args"), format!("--max-links\n{k}\n")).expect("args");
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .expect("free udp port");
    let group = format!("239.254.{}.{}:{port}", port % 250, 1 + (port / 250) % 250);
    (dir, group)
}

/// Follows node `i`'s table from its first moment (retrying its socket every
/// 20 ms): one peer list at subscription (an alive peer counts from `since_ms`
/// before the answer), then `peer_joined`/`peer_alive`/`link_up` events.
/// Sends `(i, when its table listed all n - 1 others alive)` and returns.
async fn watch_table(
    i: usize,
    sock: PathBuf,
    n: usize,
    limit: Duration,
    done: mpsc::UnboundedSender<(usize, SystemTime)>,
) {
    let deadline = Instant::now() + limit;
    let resp = loop {
        if let Ok(r) = Client::new(&sock)
            .request(Method::GET, "/v1/events", Default::default())
            .await
        {
            break r;
        }
        if Instant::now() > deadline {
            return; // the caller's deadline names the missing nodes
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mut body = resp.into_body();
    let mut buf = Vec::new();
    let mut alive: HashMap<String, SystemTime> = HashMap::new();
    // Besides the events, the peer list every 5 s: an answer lost under
    // load, or an event kind not followed here, costs 5 s of waiting (not
    // of the figure: each peer counts from its own `since_ms`) instead of
    // the run. Rarely, so that listing 256 tables is no load of its own.
    let mut relist = tokio::time::interval(Duration::from_secs(5));
    relist.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    relist.tick().await; // the first tick is at once: the `subscribed` line lists
    loop {
        let data = tokio::select! {
            frame = body.frame() => match frame {
                Some(Ok(f)) => f.into_data().unwrap_or_default(),
                _ => return, // the node went away: the caller's deadline tells
            },
            _ = relist.tick() => {
                list_alive(&sock, &mut alive).await;
                Default::default()
            }
        };
        buf.extend_from_slice(&data);
        while let Some(pos) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=pos).collect();
            let v: Value = serde_json::from_slice(&line).unwrap_or_default();
            let kind = v["type"].as_str().unwrap_or("");
            if kind == "subscribed" {
                list_alive(&sock, &mut alive).await;
            } else if matches!(kind, "peer_joined" | "peer_alive" | "link_up") {
                if let Some(name) = v["peer"]["name"].as_str() {
                    alive.entry(name.to_string()).or_insert_with(|| at(&v));
                }
            }
        }
        if alive.len() >= n - 1 {
            let full = alive
                .values()
                .copied()
                .max()
                .unwrap_or(SystemTime::UNIX_EPOCH);
            // The receiver may have given up (deadline): nothing to tell.
            let _ = done.send((i, full));
            return;
        }
    }
}

/// Adds the peers `sock` lists alive to `alive`, each from when it became
/// alive (`since_ms` before the answer), unless already there.
async fn list_alive(sock: &Path, alive: &mut HashMap<String, SystemTime>) {
    let asked = SystemTime::now();
    if let Ok(a) = Client::new(sock).get("/v1/peers").await {
        if let Ok(list) = a.parse::<PeerList>() {
            for p in list.peers.into_iter().filter(|p| p.peer.state == "alive") {
                let since = asked - Duration::from_millis(p.peer.since_ms);
                alive.entry(p.peer.name).or_insert(since);
            }
        }
    }
}

/// N processes spawned at once; returns the cluster once every table is
/// full, with (ms until then from the first spawn, ms the spawning took).
async fn start_at_once(n: usize, k: usize, tag: &str) -> (Cluster, f64, f64) {
    let (dir, group) = cluster_dir(tag, k);
    let limit = Duration::from_secs(30 + n as u64 / 4);
    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    let mut nodes = Vec::new();
    let mut watchers = Vec::new();
    let t0 = SystemTime::now();
    for i in 1..=n {
        let name = format!("b{i}");
        let (sock, p) = spawn(&dir, &group, &name, None);
        watchers.push(tokio::spawn(watch_table(
            i,
            sock.clone(),
            n,
            limit,
            done_tx.clone(),
        )));
        nodes.push((name, sock, p));
    }
    let spawned = ms_since(t0, SystemTime::now());
    let c = Cluster {
        dir,
        group,
        nodes,
        secret: None,
    };
    let deadline = tokio::time::Instant::now() + limit;
    let mut last = t0;
    let mut full = BTreeSet::new();
    while full.len() < n {
        match tokio::time::timeout_at(deadline, done_rx.recv()).await {
            Ok(Some((i, t))) => {
                full.insert(i);
                last = last.max(t);
            }
            _ => {
                let missing: Vec<usize> = (1..=n).filter(|i| !full.contains(i)).take(4).collect();
                let mut said = Vec::new();
                for &i in &missing {
                    let v = match Client::new(&c.nodes[i - 1].1).get("/v1/self").await {
                        Ok(a) => a.json().unwrap_or_default(),
                        Err(e) => json!(e.to_string()),
                    };
                    said.push(format!(
                        "b{i}: peers {} links {}",
                        v["peers"], v["links_up"]
                    ));
                }
                panic!(
                    "{tag}: {} of {n} tables full after {limit:?}; missing {said:?} (BENCH_DEBUG=info keeps logs in {})",
                    full.len(),
                    c.dir.display()
                )
            }
        }
    }
    for w in watchers {
        w.abort();
    }
    (c, ms_since(t0, last), spawned)
}

/// Waits until one event per node (`want` indices) matches `pred`; returns
/// the latest of their `at`. Panics after `limit`, naming how many did.
async fn all_say(
    rx: &mut mpsc::UnboundedReceiver<(usize, Value)>,
    want: usize,
    limit: Duration,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> SystemTime {
    let deadline = tokio::time::Instant::now() + limit;
    let mut seen = BTreeSet::new();
    let mut last = SystemTime::UNIX_EPOCH;
    while seen.len() < want {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some((i, v))) => {
                if pred(&v) && seen.insert(i) {
                    last = last.max(at(&v));
                }
            }
            _ => panic!(
                "{what}: only {} of {want} nodes within {limit:?}",
                seen.len()
            ),
        }
    }
    last
}

fn about<'a>(kind: &'static [&'static str], name: &'a str) -> impl Fn(&Value) -> bool + 'a {
    move |v| kind.iter().any(|k| v["type"] == *k) && v["peer"]["name"].as_str() == Some(name)
}

/// A newcomer's own event stream from its first moment: its `link_up`
/// times per peer, and when the subscription began (the upper bound for a
/// link that came up before it).
struct Follow {
    rx: mpsc::UnboundedReceiver<Value>,
    task: tokio::task::JoinHandle<()>,
}

impl Follow {
    fn start(sock: PathBuf) -> Follow {
        // Unbounded: one newcomer's handful of events, drained once.
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(20);
            let resp = loop {
                if let Ok(r) = Client::new(&sock)
                    .request(Method::GET, "/v1/events", Default::default())
                    .await
                {
                    break r;
                }
                if Instant::now() > deadline {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            };
            let mut body = resp.into_body();
            let mut buf = Vec::new();
            while let Some(Ok(frame)) = body.frame().await {
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                buf.extend_from_slice(&data);
                while let Some(pos) = buf.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=pos).collect();
                    let mut v: Value = serde_json::from_slice(&line).unwrap_or_default();
                    if v["type"] == "subscribed" {
                        v["local"] =
                            json!(humantime::format_rfc3339_micros(SystemTime::now()).to_string());
                    }
                    if tx.send(v).is_err() {
                        return;
                    }
                }
            }
        });
        Follow { rx, task }
    }

    /// The latest `link_up` among `peers` (each peer's first; the
    /// subscription's start for one that came up before it).
    fn latest_link_up(mut self, peers: &[String]) -> Option<SystemTime> {
        let mut up: HashMap<String, SystemTime> = HashMap::new();
        let mut subscribed = None;
        while let Ok(v) = self.rx.try_recv() {
            if v["type"] == "subscribed" {
                subscribed = v["local"]
                    .as_str()
                    .and_then(|s| humantime::parse_rfc3339(s).ok());
            } else if v["type"] == "link_up" {
                if let Some(name) = v["peer"]["name"].as_str() {
                    up.entry(name.to_string()).or_insert_with(|| at(&v));
                }
            }
        }
        self.task.abort();
        let subscribed = subscribed?;
        peers
            .iter()
            .map(|p| up.get(p).copied().unwrap_or(subscribed))
            .max()
    }
}

/// Polls a newcomer (every 10 ms, `limit` at most) until its table lists
/// `n` peers alive and it has as many links up as it wants neighbours, the
/// same on two answers at least 300 ms apart (its `neighbours` gauge can
/// lag the member list: right after a relayed list it may want one link);
/// in an overlay larger than a full mesh (`n + 1 > k + 1`) it must want at
/// least 2. Returns the names it is linked to. The figures take the links'
/// own timestamps, so this extra wait is not in them.
/// Waits until all `n` nodes list the newcomer `name` (their latest
/// timestamp is returned) and its own links are up ([`newcomer_ready`]:
/// the peers it linked to).
async fn settled_in(
    rx: &mut mpsc::UnboundedReceiver<(usize, Value)>,
    sock: &Path,
    name: &str,
    n: usize,
    k: usize,
    limit: Duration,
) -> (SystemTime, Vec<String>) {
    let listed = all_say(
        rx,
        n,
        limit,
        &format!("lists {name}"),
        about(&["peer_joined", "link_up"], name),
    )
    .await;
    (listed, newcomer_ready(sock, n, k, limit).await)
}

async fn newcomer_ready(sock: &Path, n: usize, k: usize, limit: Duration) -> Vec<String> {
    let deadline = Instant::now() + limit;
    let least = if k > 0 && n > k { 2 } else { 1 };
    let mut held: Option<(u64, Instant)> = None;
    loop {
        let me = Client::new(sock).get("/v1/self").await.ok();
        let v = me.and_then(|a| a.json().ok()).unwrap_or_default();
        let wants = v["overlay"]["neighbours"].as_u64().unwrap_or(n as u64);
        let ok = v["peers"]["alive"].as_u64() >= Some(n as u64)
            && wants >= least
            && v["links_up"].as_u64() >= Some(wants);
        held = match (ok, held) {
            (false, _) => None,
            (true, Some((w, since))) if w == wants => Some((w, since)),
            (true, _) => Some((wants, Instant::now())),
        };
        if held.is_some_and(|(_, since)| since.elapsed() >= Duration::from_millis(300)) {
            if let Ok(a) = Client::new(sock).get("/v1/peers").await {
                if let Ok(list) = a.parse::<PeerList>() {
                    return list
                        .peers
                        .into_iter()
                        .filter(|p| p.peer.link == "up")
                        .map(|p| p.peer.name)
                        .collect();
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "{}: not {n} alive with its links up after {limit:?}: {v}",
            sock.display()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits (bounded) until every node's link count is within K + 2, as the
/// overlay trims links nobody wants (1 s after they came up).
async fn settle(c: &Cluster, k: usize) {
    if k == 0 {
        return;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut over = 0;
        for (_, sock, _) in &c.nodes {
            let v = match Client::new(sock).get("/v1/self").await {
                Ok(a) => a.json().unwrap_or_default(),
                Err(_) => Value::Null,
            };
            if v["links_up"].as_u64().unwrap_or(u64::MAX) > k as u64 + 2 {
                over += 1;
            }
        }
        if over == 0 || Instant::now() > deadline {
            if over > 0 {
                eprintln!("{over} nodes still above {} links after 10 s", k + 2);
            }
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The suite for constellationd at size `n` with `--max-links k`.
async fn ours(n: usize, k: usize, o: &Opts) {
    let want = |name: &str| o.want(name);
    let system = "constellationd";
    let background = {
        let (b0, t0) = (lo_bytes(), Instant::now());
        tokio::time::sleep(Duration::from_secs(2)).await; // a measurement window
        (lo_bytes() - b0) as f64 / t0.elapsed().as_secs_f64()
    };
    // Converge: `runs` clusters started at once; the last stays up.
    let runs = if want("converge") { o.runs } else { 1 };
    let (mut conv, mut spawns) = (Vec::new(), Vec::new());
    let mut cluster = None;
    for r in 0..runs {
        drop(cluster.take()); // one cluster up at a time
        let (c, ms, sp) = start_at_once(n, k, &format!("k{k}n{n}r{r}")).await;
        conv.push(ms);
        spawns.push(sp);
        cluster = Some(c);
    }
    let c = cluster.expect("a cluster");
    if want("converge") {
        emit(
            "converge",
            n,
            system,
            k,
            &conv,
            Some(("spawning all n alone", &spawns)),
        );
    }
    settle(&c, k).await;
    tokio::time::sleep(Duration::from_secs(2)).await; // let start-up settle
    if want("idle") {
        let pids: Vec<u32> = c.nodes.iter().map(|(_, _, p)| p.0.id()).collect();
        let i = tokio::task::block_in_place(|| idle_cost(&pids, o.idle, background));
        println!("{}", idle_line(system, n, k, o.idle, background, &i));
    }
    if want("peers") {
        let s1 = &c.nodes[0].1;
        let (mut xs, mut base) = (Vec::new(), Vec::new());
        for _ in 0..20 {
            xs.push(whole_process_ms(
                Command::new(BIN)
                    .args(["peers", "--json", "--socket"])
                    .arg(s1),
            ));
            base.push(whole_process_ms(
                Command::new("curl")
                    .args(["-sf", "-o", "/dev/null", "--unix-socket"])
                    .arg(s1)
                    .arg("http://localhost/v1/peers"),
            ));
        }
        emit(
            "peers_query",
            n,
            system,
            k,
            &xs,
            Some(("curl --unix-socket /v1/peers", &base)),
        );
    }
    let lifecycle = want("lifecycle");
    let silent = want("silent_loss");
    let broadcast = want("broadcast");
    if !lifecycle && !silent && !broadcast {
        return;
    }
    let socks: Vec<PathBuf> = c.nodes.iter().map(|(_, s, _)| s.clone()).collect();
    let (mut rx, tasks) = subscribe(&socks).await;
    let limit = Duration::from_secs(30);
    if broadcast {
        // From node 0 until the last of the other N - 1 emitted it (their
        // own `at`): relayed over the overlay. Baseline: a unicast to one of
        // its neighbours, over their link.
        let client = Client::new(&c.nodes[0].1);
        let neighbour = match client.get("/v1/peers?state=alive").await {
            Ok(a) => a.parse::<PeerList>().ok().and_then(|l| {
                l.peers
                    .into_iter()
                    .find(|p| p.peer.link == "up")
                    .map(|p| p.peer.name)
            }),
            Err(_) => None,
        };
        let (mut xs, mut base) = (Vec::new(), Vec::new());
        for r in 0..o.runs {
            if let Some(to) = &neighbour {
                base.push(
                    super::message_ms(&client, &mut rx, json!(to), &format!("uni{r}"), 1).await,
                );
            }
            xs.push(
                super::message_ms(&client, &mut rx, Value::Null, &format!("all{r}"), n - 1).await,
            );
        }
        let base = (!base.is_empty()).then_some(("unicast to a neighbour", base.as_slice()));
        emit("broadcast", n, system, k, &xs, base);
    }
    if lifecycle {
        let (mut joins, mut leaves, mut crashes, mut base) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for r in 0..o.runs {
            base.push(whole_process_ms(Command::new(BIN).arg("--version")));
            // Join, then a graceful leave of the same newcomer.
            let name = format!("j{r}");
            let t0 = SystemTime::now();
            let (sock, mut p) = spawn(&c.dir, &c.group, &name, None);
            let follow = Follow::start(sock.clone());
            let (listed, linked) = settled_in(&mut rx, &sock, &name, n, k, limit).await;
            let links = follow.latest_link_up(&linked).unwrap_or(listed);
            joins.push(ms_since(t0, listed.max(links)));

            let t0 = SystemTime::now();
            let ok = Command::new("kill")
                .args(["-TERM", &p.0.id().to_string()])
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "kill -TERM {name}");
            let left = all_say(
                &mut rx,
                n,
                limit,
                &format!("{name} left"),
                about(&["peer_left"], &name),
            )
            .await;
            leaves.push(ms_since(t0, left));
            let _ = p.0.wait(); // it exits by itself after SIGTERM

            // Crash (kill -9) of another newcomer once it is settled in.
            let name = format!("c{r}");
            let (sock, mut p) = spawn(&c.dir, &c.group, &name, None);
            settled_in(&mut rx, &sock, &name, n, k, limit).await;
            let t0 = SystemTime::now();
            p.0.kill().expect("kill -9");
            let _ = p.0.wait();
            let failed = all_say(
                &mut rx,
                n,
                limit,
                &format!("{name} failed"),
                about(&["peer_failed"], &name),
            )
            .await;
            crashes.push(ms_since(t0, failed));
        }
        let start = "process start+exit (constellationd --version)";
        emit("join", n, system, k, &joins, Some((start, &base)));
        emit("graceful_leave", n, system, k, &leaves, None);
        emit("crash_detection", n, system, k, &crashes, None);
    }
    if silent {
        if MuteNobody::on().is_none() {
            println!(
                "{}",
                json!({"bench": "silent_loss", "suite": "scale", "n": n, "skipped": "needs root and iptables"})
            );
        } else {
            let mut xs = Vec::new();
            for r in 0..o.runs {
                let name = format!("m{r}");
                let (sock, mut p) = spawn_wrapped(&c.dir, &c.group, &name, None, AS_NOBODY);
                settled_in(&mut rx, &sock, &name, n, k, limit).await;
                let t0 = SystemTime::now();
                let mute = MuteNobody::on().expect("iptables rule");
                let failed = all_say(
                    &mut rx,
                    n,
                    limit,
                    &format!("silent {name} failed"),
                    about(&["peer_failed"], &name),
                )
                .await;
                xs.push(ms_since(t0, failed));
                drop(mute);
                let _ = p.0.kill(); // ours, by PID
                let _ = p.0.wait();
            }
            emit("silent_loss", n, system, k, &xs, None);
        }
    }
    for t in tasks {
        t.abort();
    }
    drop(c);
}

fn idle_line(
    system: &str,
    n: usize,
    k: usize,
    window: Duration,
    bg: f64,
    i: &super::Idle,
) -> Value {
    json!({
        "bench": "idle", "suite": "scale", "system": system, "n": n, "max_links": k,
        "window_s": window.as_secs(), "rss_mib_median": r3(i.rss), "uss_mib_median": r3(i.uss),
        "cpu_pct_mean": r3(i.cpu), "wakeups_per_s_mean": r3(i.wakeups),
        "net_bytes_per_s": r3(i.net), "lo_background_bytes_per_s": r3(bg), "load1": load1(),
    })
}

/// The same figures for Serf at size `n` (converge excepted: its nodes
/// join one by one).
fn theirs(bin: &Path, n: usize, o: &Opts) {
    let want = |name: &str| o.want(name);
    let system = "serf";
    let background = {
        let (b0, t0) = (lo_bytes(), Instant::now());
        std::thread::sleep(Duration::from_secs(2)); // a measurement window
        (lo_bytes() - b0) as f64 / t0.elapsed().as_secs_f64()
    };
    let mut sc = serf::SerfCluster::start(bin, n, &format!("scale{n}"));
    {
        use std::os::unix::fs::PermissionsExt;
        // Room for a silent-loss victim run as `nobody`.
        let _ = std::fs::set_permissions(&sc.dir, std::fs::Permissions::from_mode(0o777));
    }
    std::thread::sleep(Duration::from_secs(2)); // let start-up settle
    if want("idle") {
        let i = idle_cost(&sc.pids(), o.idle, background);
        println!("{}", idle_line(system, n, 0, o.idle, background, &i));
    }
    if want("peers") {
        let xs: Vec<f64> = (0..20)
            .map(|_| whole_process_ms(&mut sc.members_cmd(0)))
            .collect();
        emit("peers_query", n, system, 0, &xs, None);
    }
    let watchers: Vec<usize> = (0..n).collect();
    let limit = Duration::from_secs(120);
    if want("lifecycle") {
        let (mut joins, mut leaves, mut crashes) = (Vec::new(), Vec::new(), Vec::new());
        for r in 0..o.runs {
            let name = vec![format!("j{r}")];
            let t0 = SystemTime::now();
            let a = sc.spawn(&name[0]);
            sc.agents.push(a);
            let t = sc
                .wait_status(&watchers, &name, "alive", limit)
                .expect("serf join");
            joins.push(ms_since(t0, t));
            let t0 = SystemTime::now();
            sc.leave(n);
            let t = sc
                .wait_status(&watchers, &name, "left", limit)
                .expect("serf leave");
            leaves.push(ms_since(t0, t));
            sc.agents.pop();

            let name = vec![format!("c{r}")];
            let a = sc.spawn(&name[0]);
            sc.agents.push(a);
            sc.wait_status(&watchers, &name, "alive", limit)
                .expect("serf join");
            let t0 = SystemTime::now();
            let victim = sc.agents.last_mut().expect("victim");
            victim.child.kill().expect("kill -9");
            let _ = victim.child.wait();
            let t = sc
                .wait_status(&watchers, &name, "failed", limit)
                .expect("serf failed");
            crashes.push(ms_since(t0, t));
            sc.agents.pop();
        }
        emit("join", n, system, 0, &joins, None);
        emit("graceful_leave", n, system, 0, &leaves, None);
        emit("crash_detection", n, system, 0, &crashes, None);
    }
    if want("silent_loss") && MuteNobody::on().is_some() {
        let mut xs = Vec::new();
        for r in 0..o.runs {
            let name = vec![format!("m{r}")];
            let a = sc.spawn_wrapped(&name[0], AS_NOBODY);
            sc.agents.push(a);
            sc.wait_status(&watchers, &name, "alive", limit)
                .expect("serf join");
            let t0 = SystemTime::now();
            let mute = MuteNobody::on().expect("iptables rule");
            let t = sc
                .wait_status(&watchers, &name, "failed", limit)
                .expect("serf failed");
            xs.push(ms_since(t0, t));
            drop(mute);
            sc.agents.pop();
        }
        emit("silent_loss", n, system, 0, &xs, None);
    }
}
