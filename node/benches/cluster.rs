//! Cluster benchmarks on loopback, printing one JSON line per figure, each
//! beside a baseline measured in the same run (and their ratio).
//!
//! `cargo bench -p constellationd --bench cluster [-- --quick]`
//!
//! - `join`: from spawning node N+1 until every one of the N others reports
//!   its link to it up (the `at` of their `link_up` events), median of runs.
//!   Baseline: whole-process time of `constellationd --version` (what starting
//!   a process costs at all).
//! - `converge_seed`: a whole cluster of N started at once (all processes
//!   spawned in one go), multicast off, the first node the one seed of all
//!   others: from the first spawn until every node's table lists all others
//!   linked (each node's own `link_up` timestamps; what happened before its
//!   event subscription, from its peer list's `since_ms`). Baseline: the same
//!   start by multicast.
//! - `peers_query`: whole-process wall time of `constellationd peers --json`
//!   against a 32-node cluster. Baseline: `curl --unix-socket` of the same URL.
//! - `broadcast`: from `POST /v1/messages` with `to: null` on one node until
//!   all others emitted the message on their event streams. Baseline: the same
//!   for a unicast to one peer.
//!
//! - `crash_detection`, `restart`, `graceful_leave` (16 nodes): from `kill -9`
//!   (or a restart's spawn, or SIGTERM) until every other node reported the
//!   node `failed` (`alive` again as a single entry, `left`). Baseline: a
//!   unicast message's latency in the same cluster (the floor of anything that
//!   crosses it).
//!
//! - `tags_change` (16 nodes): from `PATCH /v1/self/tags` on one node until
//!   every other emitted `peer_updated` with the new value. `query` (16
//!   nodes): from `POST /v1/queries` until its stream's `done` line with
//!   all 16 answered by each node's `query:bench=/bin/cat` handler;
//!   `query_api_answerer`: the same, each node's answerer a program that
//!   follows `/v1/events` and posts the payload back. Baseline for all
//!   three: a broadcast message to the same nodes in the same cluster.
//!
//! - Against cluster size (`-- --sizes 16,64,128,256 [--max-links 8]
//!   [--mesh-sizes 16,64] [--serf-sizes 16,64,128] [--runs 5]`): converge,
//!   join, leave, crash, silent loss, `peers` and idle cost (CPU, wake-ups,
//!   network, memory) at each size, where "seen by all" means every node's
//!   table (see `scale.rs`); only these figures run then.
//!
//! Every node runs on interface lo with TTL 0 on a group of its own; every
//! process is killed when the benchmark ends.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use http_body_util::BodyExt;
use hyper::Method;
use node::client::Client;
use proto::control::PeerList;
use serde_json::{json, Value};
use tokio::sync::mpsc;

#[path = "../tests/support/mod.rs"]
mod support;

mod scale;
mod serf;

const BIN: &str = env!("CARGO_BIN_EXE_constellationd");

/// `BENCH_DEBUG=1` keeps every node's debug log in its cluster directory
/// (`BENCH_DEBUG=info`: its info log).
fn keep_logs() -> bool {
    std::env::var_os("BENCH_DEBUG").is_some()
}

/// The nodes' log filter: `BENCH_DEBUG=1` means debug, any other value is
/// taken as the filter itself (`BENCH_DEBUG=info` costs less time).
fn log_level() -> String {
    match std::env::var("BENCH_DEBUG") {
        Ok(v) if v != "1" && !v.is_empty() => v,
        Ok(_) => "debug".into(),
        Err(_) => "warn".into(),
    }
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill(); // ours, by PID; may have exited already
        let _ = self.0.wait();
    }
}

struct Cluster {
    dir: PathBuf,
    group: String,
    nodes: Vec<(String, PathBuf, Proc)>,
    /// The secret file every node of this cluster runs with, if any.
    secret: Option<PathBuf>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.nodes.clear();
        if !keep_logs() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn spawn(dir: &Path, group: &str, name: &str, secret: Option<&Path>) -> (PathBuf, Proc) {
    spawn_wrapped(dir, group, name, secret, &[])
}

/// Flags every node of a cluster gets (seeds, --no-multicast), set once per
/// cluster by `start_cluster_seeded`.
fn extra_args(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("extra.args"))
        .map(|t| t.lines().map(String::from).collect())
        .unwrap_or_default()
}

/// Like [`spawn`], the command prefixed by `wrap` (e.g. `setpriv`).
fn spawn_wrapped(
    dir: &Path,
    group: &str,
    name: &str,
    secret: Option<&Path>,
    wrap: &[&str],
) -> (PathBuf, Proc) {
    let sock = dir.join(format!("{name}.sock"));
    let mut cmd = match wrap.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(BIN);
            c
        }
        None => Command::new(BIN),
    };
    let mut base = support::loopback_args(name, group, &sock);
    let extra = extra_args(dir);
    if extra.iter().any(|a| a == "--listen") {
        // The cluster's --listen (an allocated port) replaces port 0.
        if let Some(i) = base.iter().position(|a| a == "--listen") {
            base.drain(i..i + 2);
        }
    }
    cmd.args(base);
    if !extra.iter().any(|a| a == "--max-links") {
        // The figures at fixed sizes are the full mesh's; `--sizes` names
        // its `--max-links` in the cluster's flags.
        cmd.args(["--max-links", "0"]);
    }
    cmd.args(extra);
    if let Some(file) = secret {
        cmd.arg("--secret-file").arg(file);
    }
    let child = cmd
        .env("RUST_LOG", log_level())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(if keep_logs() {
            Stdio::from(std::fs::File::create(dir.join(format!("{name}.log"))).expect("log"))
        } else {
            Stdio::null()
        })
        .spawn()
        .expect("spawn node");
    (sock, Proc(child))
}

async fn linked(sock: &Path) -> usize {
    match Client::new(sock).get("/v1/peers?state=alive").await {
        Ok(a) => a
            .parse::<PeerList>()
            .map(|l| l.peers.iter().filter(|p| p.peer.link == "up").count())
            .unwrap_or(0),
        Err(_) => 0,
    }
}

async fn start_cluster(n: usize, tag: &str) -> Cluster {
    start_cluster_with(n, tag, false).await
}

/// A cluster of `n` nodes with no multicast at all: the first is started
/// alone, every other (and every later newcomer) gets it as `--seed`.
async fn start_cluster_seeded(n: usize, tag: &str) -> Cluster {
    let dir = std::env::temp_dir().join(format!("cst-bench-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(dir.join("extra.args"), "--no-multicast\n").expect("args");
    let group = "239.255.99.99:9".to_string(); // never bound: --no-multicast
    let (sock1, p1) = spawn(&dir, &group, "b1", None);
    let deadline = Instant::now() + Duration::from_secs(10);
    let listen = loop {
        if let Ok(a) = Client::new(&sock1).get("/v1/self").await {
            if let Ok(v) = a.parse::<proto::control::NodeInfo>() {
                break v.listen;
            }
        }
        assert!(Instant::now() < deadline, "seed node did not start");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    std::fs::write(
        dir.join("extra.args"),
        format!("--no-multicast\n--seed\n{listen}\n"),
    )
    .expect("args");
    let mut nodes = vec![("b1".to_string(), sock1, p1)];
    for i in 2..=n {
        let name = format!("b{i}");
        let (sock, p) = spawn(&dir, &group, &name, None);
        nodes.push((name, sock, p));
    }
    let c = Cluster {
        dir,
        group,
        nodes,
        secret: None,
    };
    wait_mesh(&c).await;
    c
}

/// Join through one seed with multicast off, against the multicast join,
/// runs interleaved on two clusters of `n` up at the same time.
async fn join_seed_bench(n: usize, runs: usize) {
    let mcast = start_cluster(n, &format!("jm{n}")).await;
    let seeded = start_cluster_seeded(n, &format!("jsd{n}")).await;
    let (ms, ss) = (sockets(&mcast), sockets(&seeded));
    let (mut xs, mut base) = (Vec::new(), Vec::new());
    for r in 0..runs {
        base.push(join_once(&mcast, &ms, &format!("m{r}")).await);
        xs.push(join_once(&seeded, &ss, &format!("s{r}")).await);
    }
    report(
        "join_seed",
        json!({"n": n, "multicast": false}),
        xs,
        "the same join by multicast",
        base,
    );
}

/// Follows node `i`'s table from its first moment: subscribes to its
/// events as soon as its control socket answers, takes one peer list
/// (what happened before the subscription: a linked peer counts from when
/// it became alive, `since_ms` before the answer), then counts `link_up`
/// events. Sends `(i, when its table was full)` once `n - 1` peers are
/// linked: the latest of their own timestamps.
async fn watch_until_full(
    i: usize,
    sock: PathBuf,
    n: usize,
    done: mpsc::UnboundedSender<(usize, SystemTime)>,
) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let resp = loop {
        if let Ok(r) = Client::new(&sock)
            .request(Method::GET, "/v1/events", Default::default())
            .await
        {
            break r;
        }
        assert!(
            Instant::now() < deadline,
            "{} never answered",
            sock.display()
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    let mut body = resp.into_body();
    let mut buf = Vec::new();
    let mut up: std::collections::HashMap<String, SystemTime> = Default::default();
    let mut reported = false;
    while let Some(Ok(frame)) = body.frame().await {
        let Ok(data) = frame.into_data() else {
            continue;
        };
        buf.extend_from_slice(&data);
        while let Some(pos) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=pos).collect();
            let v: Value = serde_json::from_slice(&line).unwrap_or_default();
            if v["type"] == "subscribed" {
                let asked = SystemTime::now();
                if let Ok(a) = Client::new(&sock).get("/v1/peers").await {
                    if let Ok(list) = a.parse::<PeerList>() {
                        for p in list.peers {
                            if p.peer.link == "up" && p.peer.state == "alive" {
                                let since = asked - Duration::from_millis(p.peer.since_ms);
                                up.entry(p.peer.name.clone()).or_insert(since);
                            }
                        }
                    }
                }
            } else if v["type"] == "link_up" {
                if let Some(name) = v["peer"]["name"].as_str() {
                    up.entry(name.to_string()).or_insert_with(|| at(&v));
                }
            }
            if !reported && up.len() >= n - 1 {
                reported = true;
                let full = up.values().copied().max().unwrap_or(SystemTime::UNIX_EPOCH);
                if done.send((i, full)).is_err() {
                    return;
                }
            }
        }
    }
}

/// One whole cluster of `n` started at once (every process spawned in one
/// go): ms from the first spawn until the last node's table lists all
/// others linked, by the nodes' own timestamps. `seeded`: multicast off,
/// every node but the first given the first as its one seed (its port
/// allocated beforehand); else multicast on a group of its own.
async fn converge_once(n: usize, seeded: bool, tag: &str) -> (f64, f64) {
    let dir = std::env::temp_dir().join(format!("cst-bench-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let free = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("free port")
    };
    let udp = std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .expect("free udp port");
    let group = format!("239.255.{}.{}:{udp}", 100 + n % 100, 1 + udp % 250);
    let seed_port = free();
    let mut nodes = Vec::new();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    let mut watchers = Vec::new();
    let t0 = SystemTime::now();
    for i in 1..=n {
        let name = format!("b{i}");
        let args = match (seeded, i) {
            (false, _) => String::new(),
            (true, 1) => format!("--no-multicast\n--listen\n127.0.0.1:{seed_port}\n"),
            (true, _) => format!("--no-multicast\n--seed\n127.0.0.1:{seed_port}\n"),
        };
        std::fs::write(dir.join("extra.args"), args).expect("args");
        let (sock, p) = spawn(&dir, &group, &name, None);
        watchers.push(tokio::spawn(watch_until_full(
            i,
            sock.clone(),
            n,
            done_tx.clone(),
        )));
        nodes.push((name, sock, p));
    }
    let spawned = SystemTime::now();
    let c = Cluster {
        dir,
        group,
        nodes,
        secret: None,
    };
    let mut last = t0;
    let mut full_nodes = std::collections::BTreeSet::new();
    for _ in 0..n {
        let Ok(got) = tokio::time::timeout(Duration::from_secs(30), done_rx.recv()).await else {
            panic!(
                "{tag}: only nodes {full_nodes:?} had full tables after 30 s (BENCH_DEBUG=1 keeps the logs in {})",
                c.dir.display()
            );
        };
        let (i, full) = got.expect("watchers alive");
        full_nodes.insert(i);
        last = last.max(full);
    }
    for w in watchers {
        w.abort();
    }
    drop(c);
    (ms_since(t0, last), ms_since(t0, spawned))
}

/// A whole cluster of `n` started at once with one seed and multicast off,
/// against the same start by multicast; runs interleaved, one cluster up
/// at a time.
async fn converge_seed_bench(n: usize, runs: usize) {
    let (mut xs, mut base, mut spawn) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..runs {
        let (m, sm) = converge_once(n, false, &format!("cvm{n}x{r}")).await;
        let (x, sx) = converge_once(n, true, &format!("cvs{n}x{r}")).await;
        base.push(m);
        xs.push(x);
        spawn.extend([sm, sx]);
    }
    // How long spawning the n processes took (part of both figures).
    let spawn_ms = round(stats(spawn).0);
    report(
        "converge_seed",
        json!({"n": n, "multicast": false, "seeds": 1, "spawn_all_median_ms": spawn_ms}),
        xs,
        "the same start by multicast",
        base,
    );
}

/// A cluster of `n` nodes, all with one fresh cluster key when `secured`.
async fn start_cluster_with(n: usize, tag: &str, secured: bool) -> Cluster {
    start_cluster_args(n, tag, secured, &[]).await
}

/// Like [`start_cluster_with`], every node also given `extra` flags.
async fn start_cluster_args(n: usize, tag: &str, secured: bool, extra: &[&str]) -> Cluster {
    let dir = std::env::temp_dir().join(format!("cst-bench-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    if !extra.is_empty() {
        std::fs::write(dir.join("extra.args"), extra.join("\n") + "\n").expect("args");
    }
    let secret = secured.then(|| {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join("cluster.key");
        let key = proto::secure::Key::generate().to_base64();
        std::fs::write(&path, key + "\n").expect("key file");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        path
    });
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let group = format!("239.255.{}.{}:{port}", n % 250, 1 + port % 250);
    let nodes = (1..=n)
        .map(|i| {
            let name = format!("b{i}");
            let (sock, p) = spawn(&dir, &group, &name, secret.as_deref());
            (name, sock, p)
        })
        .collect();
    let c = Cluster {
        dir,
        group,
        nodes,
        secret,
    };
    wait_mesh(&c).await;
    c
}

/// Subscribes to every socket's event stream; events arrive as (index, event).
async fn subscribe(
    socks: &[PathBuf],
) -> (
    mpsc::UnboundedReceiver<(usize, Value)>,
    Vec<tokio::task::JoinHandle<()>>,
) {
    // Unbounded: a benchmark's bounded number of events, read promptly.
    let (tx, rx) = mpsc::unbounded_channel();
    let mut tasks = Vec::new();
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel();
    for (i, sock) in socks.iter().enumerate() {
        let (tx, ready_tx, sock) = (tx.clone(), ready_tx.clone(), sock.clone());
        tasks.push(tokio::spawn(async move {
            let resp = Client::new(&sock)
                .request(Method::GET, "/v1/events", Default::default())
                .await
                .expect("events");
            let mut body = resp.into_body();
            let mut buf = Vec::new();
            while let Some(Ok(frame)) = body.frame().await {
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                buf.extend_from_slice(&data);
                while let Some(pos) = buf.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=pos).collect();
                    let v: Value = serde_json::from_slice(&line).unwrap_or_default();
                    if v["type"] == "subscribed" {
                        let _ = ready_tx.send(());
                    } else if tx.send((i, v)).is_err() {
                        return;
                    }
                }
            }
        }));
    }
    for _ in socks {
        ready_rx.recv().await;
    }
    (rx, tasks)
}

fn at(v: &Value) -> SystemTime {
    humantime::parse_rfc3339(v["at"].as_str().unwrap_or("")).expect("event time")
}

fn ms_since(t0: SystemTime, t: SystemTime) -> f64 {
    t.duration_since(t0)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0)
}

/// Waits for one event per index in `want` matching `pred`; returns the latest `at`.
async fn latest(
    rx: &mut mpsc::UnboundedReceiver<(usize, Value)>,
    want: usize,
    pred: impl Fn(&Value) -> bool,
) -> SystemTime {
    let mut seen = std::collections::HashSet::new();
    let mut last = SystemTime::UNIX_EPOCH;
    while seen.len() < want {
        let (i, v) = tokio::time::timeout(Duration::from_secs(20), rx.recv())
            .await
            .expect("events within 20 s")
            .expect("stream open");
        if pred(&v) && seen.insert(i) {
            last = last.max(at(&v));
        }
    }
    last
}

/// Sends a message (`to`: a peer, or null to broadcast) and returns the ms
/// until `recipients` event streams emitted it.
async fn message_ms(
    client: &Client,
    rx: &mut mpsc::UnboundedReceiver<(usize, Value)>,
    to: Value,
    topic: &str,
    recipients: usize,
) -> f64 {
    let t0 = SystemTime::now();
    let body = json!({"to": to, "topic": topic, "payload": "x"});
    let answer = client
        .post("/v1/messages", Some(&body))
        .await
        .expect("send");
    assert!(answer.status.is_success(), "{}", answer.error_message());
    let last = latest(rx, recipients, |v| {
        v["type"] == "message" && v["topic"] == topic
    })
    .await;
    ms_since(t0, last)
}

fn stats(mut xs: Vec<f64>) -> (f64, f64, f64) {
    xs.sort_by(f64::total_cmp);
    (xs[xs.len() / 2], xs[0], xs[xs.len() - 1])
}

fn whole_process_ms(cmd: &mut Command) -> f64 {
    let t = Instant::now();
    let out = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("run");
    assert!(out.success());
    t.elapsed().as_secs_f64() * 1000.0
}

fn report(name: &str, extra: Value, xs: Vec<f64>, base_name: &str, base: Vec<f64>) {
    let (med, min, max) = stats(xs.clone());
    let (bmed, bmin, bmax) = stats(base.clone());
    let mut line = json!({
        "bench": name, "runs": xs.len(), "median_ms": round(med), "min_ms": round(min), "max_ms": round(max),
        "baseline": base_name, "baseline_median_ms": round(bmed), "baseline_min_ms": round(bmin), "baseline_max_ms": round(bmax),
        "ratio_to_baseline": round(med / bmed), "load1": scale::load1(),
    });
    if let (Value::Object(l), Value::Object(e)) = (&mut line, extra) {
        l.extend(e);
    }
    println!("{line}");
}

fn round(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// One join: from spawning a newcomer until every node of `c` reports its
/// link to it up (ms); then it leaves again, so runs start alike.
async fn join_once(c: &Cluster, socks: &[PathBuf], name: &str) -> f64 {
    let n = socks.len();
    let (mut rx, tasks) = subscribe(socks).await;
    let t0 = SystemTime::now();
    let (sock, mut p) = spawn(&c.dir, &c.group, name, c.secret.as_deref());
    let last = latest(&mut rx, n, |v| {
        v["type"] == "link_up" && v["peer"]["name"] == name
    })
    .await;
    let took = ms_since(t0, last);
    // The newcomer's own table must list all N alive with links up.
    let deadline = Instant::now() + Duration::from_secs(5);
    while linked(&sock).await != n {
        assert!(
            Instant::now() < deadline,
            "newcomer did not list {n} linked peers"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Leave gracefully so the next run starts from the same cluster.
    let _ = Command::new("kill")
        .args(["-TERM", &p.0.id().to_string()])
        .status();
    let _ = p.0.wait();
    latest(&mut rx, n, |v| {
        v["type"] == "peer_left" && v["peer"]["name"] == name
    })
    .await;
    for t in tasks {
        t.abort();
    }
    took
}

fn sockets(c: &Cluster) -> Vec<PathBuf> {
    c.nodes.iter().map(|(_, s, _)| s.clone()).collect()
}

async fn join_bench(n: usize, runs: usize) {
    let c = start_cluster(n, &format!("join{n}")).await;
    let socks = sockets(&c);
    let mut xs = Vec::new();
    let mut base = Vec::new();
    for r in 0..runs {
        base.push(whole_process_ms(Command::new(BIN).arg("--version")));
        xs.push(join_once(&c, &socks, &format!("new{r}")).await);
    }
    report(
        "join",
        json!({"n": n, "system": "constellationd"}),
        xs.clone(),
        "process start+exit (constellationd --version)",
        base,
    );
    drop(c);
    if let Some(bin) = serf::bin() {
        let mut sc = serf::SerfCluster::start(&bin, n, &format!("join{n}"));
        let watchers: Vec<usize> = (0..n).collect();
        let mut joins = Vec::new();
        for r in 0..runs {
            let name = format!("new{r}");
            let t0 = SystemTime::now();
            let a = sc.spawn(&name);
            sc.agents.push(a);
            let at = sc
                .wait_status(
                    &watchers,
                    std::slice::from_ref(&name),
                    "alive",
                    Duration::from_secs(60),
                )
                .expect("serf join within 60 s");
            joins.push(ms_since(t0, at));
            sc.leave(n);
            sc.wait_status(
                &watchers,
                std::slice::from_ref(&name),
                "left",
                Duration::from_secs(60),
            )
            .expect("serf leave within 60 s");
            sc.agents.pop();
        }
        report_vs_serf("join", json!({"n": n}), joins, xs);
    }
}

/// A Serf figure beside constellationd's from the same run.
fn report_vs_serf(name: &str, extra: Value, serf: Vec<f64>, ours: Vec<f64>) {
    let mut extra = extra;
    extra["system"] = json!("serf");
    report(name, extra, serf, "constellationd (same run)", ours);
}

/// Join time with a cluster secret against without, runs interleaved on two
/// clusters of `n` that are up at the same time.
async fn join_secret_bench(n: usize, runs: usize) {
    let plain = start_cluster_with(n, &format!("jp{n}"), false).await;
    let secured = start_cluster_with(n, &format!("js{n}"), true).await;
    let (ps, ss) = (sockets(&plain), sockets(&secured));
    let (mut xs, mut base) = (Vec::new(), Vec::new());
    for r in 0..runs {
        base.push(join_once(&plain, &ps, &format!("p{r}")).await);
        xs.push(join_once(&secured, &ss, &format!("s{r}")).await);
    }
    let delta = stats(xs.clone()).0 - stats(base.clone()).0;
    report(
        "join_secret",
        json!({"n": n, "delta_ms": round(delta)}),
        xs,
        "the same join without a secret",
        base,
    );
}

async fn peers_and_broadcast(n: usize, runs: usize, msg_runs: usize) {
    let c = start_cluster(n, "q").await;
    let s1 = c.nodes[0].1.clone();
    let mut xs = Vec::new();
    let mut base = Vec::new();
    for _ in 0..runs {
        xs.push(whole_process_ms(
            Command::new(BIN)
                .args(["peers", "--json", "--socket"])
                .arg(&s1),
        ));
        base.push(whole_process_ms(
            Command::new("curl")
                .args(["-sf", "-o", "/dev/null", "--unix-socket"])
                .arg(&s1)
                .arg("http://localhost/v1/peers"),
        ));
    }
    report(
        "peers_query",
        json!({"n": n, "system": "constellationd"}),
        xs.clone(),
        "curl --unix-socket /v1/peers",
        base,
    );
    let peers_ms = xs;

    let others: Vec<PathBuf> = c.nodes[1..].iter().map(|(_, s, _)| s.clone()).collect();
    let (mut rx, _tasks) = subscribe(&others).await;
    let client = Client::new(&s1);
    let mut xs = Vec::new();
    let mut base = Vec::new();
    for r in 0..msg_runs {
        base.push(message_ms(&client, &mut rx, json!("b2"), &format!("uni{r}"), 1).await);
        xs.push(message_ms(&client, &mut rx, Value::Null, &format!("all{r}"), n - 1).await);
    }
    report(
        "broadcast",
        json!({"n": n, "recipients": n - 1, "system": "constellationd"}),
        xs.clone(),
        "unicast to one peer",
        base,
    );
    let broadcast_ms = xs;
    drop(c);
    if let Some(bin) = serf::bin() {
        let sc = serf::SerfCluster::start(&bin, n, "q");
        let members: Vec<f64> = (0..runs)
            .map(|_| whole_process_ms(&mut sc.members_cmd(0)))
            .collect();
        report_vs_serf(
            "peers_query",
            json!({"n": n, "command": "serf members"}),
            members,
            peers_ms,
        );
        let watchers: Vec<usize> = (1..n).collect();
        let mut xs = Vec::new();
        for r in 0..msg_runs {
            let name = format!("all{r}");
            let t0 = SystemTime::now();
            sc.event(0, &name);
            let at = sc
                .user_event_seen(&watchers, &name, Duration::from_secs(30))
                .expect("serf user event everywhere within 30 s");
            xs.push(ms_since(t0, at));
        }
        report_vs_serf(
            "broadcast",
            json!({"n": n, "recipients": n - 1, "command": "serf event -coalesce=false"}),
            xs,
            broadcast_ms,
        );
    }
}

async fn lifecycle(n: usize, runs: usize) {
    let mut c = start_cluster(n, "life").await;
    let others: Vec<PathBuf> = c.nodes[..n - 1].iter().map(|(_, s, _)| s.clone()).collect();
    let (mut rx, _tasks) = subscribe(&others).await;
    let client = Client::new(&others[0]);
    let (mut crash, mut restart, mut leave, mut base) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for r in 0..runs {
        base.push(message_ms(&client, &mut rx, json!("b2"), &format!("floor{r}"), 1).await);

        let name = c.nodes[n - 1].0.clone();
        let victim = &mut c.nodes[n - 1].2;
        let t0 = SystemTime::now();
        victim.0.kill().expect("kill -9");
        let _ = victim.0.wait();
        let last = latest(&mut rx, n - 1, |v| {
            v["type"] == "peer_failed" && v["peer"]["name"] == name.as_str()
        })
        .await;
        crash.push(ms_since(t0, last));

        let t0 = SystemTime::now();
        let (sock, p) = spawn(&c.dir, &c.group, &name, None);
        let last = latest(&mut rx, n - 1, |v| {
            v["type"] == "peer_restarted" && v["peer"]["name"] == name.as_str()
        })
        .await;
        restart.push(ms_since(t0, last));
        c.nodes[n - 1] = (name.clone(), sock, p);
        let deadline = Instant::now() + Duration::from_secs(10);
        while linked(&c.nodes[n - 1].1).await != n - 1 {
            assert!(Instant::now() < deadline, "restarted node did not mesh");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }

        let pid = c.nodes[n - 1].2 .0.id().to_string();
        let t0 = SystemTime::now();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let last = latest(&mut rx, n - 1, |v| {
            v["type"] == "peer_left" && v["peer"]["name"] == name.as_str()
        })
        .await;
        leave.push(ms_since(t0, last));
        let _ = c.nodes[n - 1].2 .0.wait();
        let (sock, p) = spawn(&c.dir, &c.group, &name, None);
        latest(&mut rx, n - 1, |v| {
            v["type"] == "link_up" && v["peer"]["name"] == name.as_str()
        })
        .await;
        c.nodes[n - 1] = (name, sock, p);
    }
    let floor = "unicast message latency";
    let ours = json!({"n": n, "system": "constellationd"});
    report(
        "crash_detection",
        ours.clone(),
        crash.clone(),
        floor,
        base.clone(),
    );
    report("restart", ours.clone(), restart, floor, base.clone());
    report("graceful_leave", ours, leave.clone(), floor, base);
    drop(c);
    if let Some(bin) = serf::bin() {
        let mut sc = serf::SerfCluster::start(&bin, n - 1, "life");
        let watchers: Vec<usize> = (0..n - 1).collect();
        let (mut s_crash, mut s_leave) = (Vec::new(), Vec::new());
        for r in 0..runs {
            for (kind, out) in [("crash", &mut s_crash), ("leave", &mut s_leave)] {
                let name = format!("{kind}{r}");
                let a = sc.spawn(&name);
                sc.agents.push(a);
                let names = std::slice::from_ref(&name);
                sc.wait_status(&watchers, names, "alive", Duration::from_secs(60))
                    .expect("serf victim joins");
                let t0 = SystemTime::now();
                let status = if kind == "crash" {
                    let victim = sc.agents.last_mut().expect("victim");
                    victim.child.kill().expect("kill -9");
                    let _ = victim.child.wait();
                    "failed"
                } else {
                    sc.leave(n - 1);
                    "left"
                };
                let at = sc
                    .wait_status(&watchers, names, status, Duration::from_secs(60))
                    .expect("serf sees the victim go within 60 s");
                out.push(ms_since(t0, at));
                sc.agents.pop();
            }
        }
        report_vs_serf("crash_detection", json!({"n": n}), s_crash, crash);
        report_vs_serf("graceful_leave", json!({"n": n}), s_leave, leave);
    }
}

/// Runs a command as the unprivileged user `nobody`.
const AS_NOBODY: &[&str] = &[
    "setpriv",
    "--reuid=65534",
    "--regid=65534",
    "--clear-groups",
    "--",
];

/// An iptables rule that drops everything user `nobody` sends on lo: a node
/// run as `nobody` goes silent, with no reset and no FIN, as behind a cut
/// cable. Removed on drop. Only on lo, only for that user.
struct MuteNobody;

impl MuteNobody {
    const RULE: &'static [&'static str] = &[
        "OUTPUT",
        "-o",
        "lo",
        "-m",
        "owner",
        "--uid-owner",
        "65534",
        "-m",
        "comment",
        "--comment",
        "constellationd-bench",
        "-j",
        "DROP",
    ];

    fn on() -> Option<MuteNobody> {
        let ok = Command::new("iptables")
            .arg("-I")
            .args(Self::RULE)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(MuteNobody)
    }
}

impl Drop for MuteNobody {
    fn drop(&mut self) {
        let _ = Command::new("iptables").arg("-D").args(Self::RULE).status();
    }
}

/// Silent loss: a node of an N-node cluster stops sending anything (see
/// [`MuteNobody`]); time until every other node marks it failed. Needs root
/// and iptables (skipped with a note otherwise).
async fn silent_loss(n: usize, runs: usize) {
    if MuteNobody::on().is_none() {
        println!(
            "{}",
            json!({"bench": "silent_loss", "skipped": "needs root and iptables"})
        );
        return;
    }
    let c = start_cluster(n - 1, "mute").await;
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&c.dir, std::fs::Permissions::from_mode(0o777));
    }
    let socks = sockets(&c);
    let mut ours = Vec::new();
    for r in 0..runs {
        let (mut rx, tasks) = subscribe(&socks).await;
        let name = format!("mute{r}");
        let (_, mut p) = spawn_wrapped(&c.dir, &c.group, &name, None, AS_NOBODY);
        latest(&mut rx, n - 1, |v| {
            v["type"] == "link_up" && v["peer"]["name"] == name.as_str()
        })
        .await;
        let t0 = SystemTime::now();
        let mute = MuteNobody::on().expect("iptables rule");
        let last = latest(&mut rx, n - 1, |v| {
            v["type"] == "peer_failed" && v["peer"]["name"] == name.as_str()
        })
        .await;
        ours.push(ms_since(t0, last));
        drop(mute);
        let _ = p.0.kill();
        let _ = p.0.wait();
        for t in tasks {
            t.abort();
        }
    }
    report(
        "silent_loss",
        json!({"n": n, "system": "constellationd"}),
        ours.clone(),
        "the configured bound (--dead-after)",
        vec![1400.0],
    );
    drop(c);
    if let Some(bin) = serf::bin() {
        let mut sc = serf::SerfCluster::start(&bin, n - 1, "mute");
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&sc.dir, std::fs::Permissions::from_mode(0o777));
        }
        let watchers: Vec<usize> = (0..n - 1).collect();
        let mut theirs = Vec::new();
        for r in 0..runs {
            let name = format!("mute{r}");
            let a = sc.spawn_wrapped(&name, AS_NOBODY);
            sc.agents.push(a);
            let names = std::slice::from_ref(&name);
            sc.wait_status(&watchers, names, "alive", Duration::from_secs(60))
                .expect("serf victim joins");
            let t0 = SystemTime::now();
            let mute = MuteNobody::on().expect("iptables rule");
            let at = sc
                .wait_status(&watchers, names, "failed", Duration::from_secs(120))
                .expect("serf marks the silent node failed within 120 s");
            theirs.push(ms_since(t0, at));
            drop(mute);
            sc.agents.pop();
        }
        report_vs_serf("silent_loss", json!({"n": n}), theirs, ours);
    }
}

/// CPU time (ns) and times scheduled in, summed over every thread of
/// `pid` (`/proc/PID/task/*/schedstat`: run time, wait time, timeslices).
/// Threads that ended meanwhile are not counted.
fn sched(pid: u32) -> (u64, u64) {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return (0, 0);
    };
    let mut total = (0, 0);
    for t in tasks.flatten() {
        let text = std::fs::read_to_string(t.path().join("schedstat")).unwrap_or_default();
        let f: Vec<u64> = text
            .split_whitespace()
            .filter_map(|v| v.parse().ok())
            .collect();
        if let [run_ns, _, slices] = f[..] {
            total.0 += run_ns;
            total.1 += slices;
        }
    }
    total
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Unique set size: memory only this process holds (private pages).
fn uss_kib(pid: u32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with("Private_Clean:") || l.starts_with("Private_Dirty:"))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum()
}

fn lo_bytes() -> u64 {
    ["rx_bytes", "tx_bytes"]
        .iter()
        .map(|f| {
            std::fs::read_to_string(format!("/sys/class/net/lo/statistics/{f}"))
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0)
        })
        .sum::<u64>()
        / 2 // each loopback byte is counted once sent and once received
}

/// Idle cost of `pids` over `window`.
struct Idle {
    /// Median resident set, MiB (shared pages of the binary included).
    rss: f64,
    /// Median unique set, MiB (private pages only).
    uss: f64,
    /// Mean CPU, % of one core.
    cpu: f64,
    /// Mean times each node was scheduled in, per second (all threads).
    wakeups: f64,
    /// Loopback bytes per node per second, net of the background rate.
    net: f64,
}

fn idle_cost(pids: &[u32], window: Duration, background: f64) -> Idle {
    let s0: Vec<(u64, u64)> = pids.iter().map(|&p| sched(p)).collect();
    let (b0, t0) = (lo_bytes(), Instant::now());
    std::thread::sleep(window); // a measurement window, not synchronisation
    let (b1, secs) = (lo_bytes(), t0.elapsed().as_secs_f64());
    let s1: Vec<(u64, u64)> = pids.iter().map(|&p| sched(p)).collect();
    let per_node = |f: fn(&(u64, u64)) -> u64| {
        s0.iter()
            .zip(&s1)
            .map(|(a, b)| f(b).saturating_sub(f(a)) as f64)
            .sum::<f64>()
            / pids.len() as f64
            / secs
    };
    let cpu = per_node(|s| s.0) / 1e9 * 100.0;
    let wakeups = per_node(|s| s.1);
    let rss = stats(pids.iter().map(|&p| rss_kib(p) as f64 / 1024.0).collect()).0;
    let uss = stats(pids.iter().map(|&p| uss_kib(p) as f64 / 1024.0).collect()).0;
    let net = ((b1 - b0) as f64 / secs - background).max(0.0) / pids.len() as f64;
    Idle {
        rss,
        uss,
        cpu,
        wakeups,
        net,
    }
}

/// Resident memory, idle CPU and idle loopback traffic per node of an idle
/// N-node cluster, constellationd then Serf. The loopback rate with neither
/// running is measured first and subtracted (other users of lo).
async fn resources(n: usize, window: Duration) {
    let background = {
        let (b0, t0) = (lo_bytes(), Instant::now());
        tokio::time::sleep(window / 2).await; // measurement window
        (lo_bytes() - b0) as f64 / t0.elapsed().as_secs_f64()
    };
    let c = start_cluster(n, "res").await;
    tokio::time::sleep(Duration::from_secs(2)).await; // let start-up settle
    let pids: Vec<u32> = c.nodes.iter().map(|(_, _, p)| p.0.id()).collect();
    let ours = tokio::task::block_in_place(|| idle_cost(&pids, window, background));
    drop(c);
    let line = |system: &str, i: Idle| {
        json!({
            "bench": "idle", "system": system, "n": n, "window_s": window.as_secs(),
            "rss_mib_median": round(i.rss), "uss_mib_median": round(i.uss),
            "cpu_pct_mean": round(i.cpu), "wakeups_per_s_mean": round(i.wakeups), "net_bytes_per_s": round(i.net),
            "lo_background_bytes_per_s": round(background),
        })
    };
    println!("{}", line("constellationd", ours));
    if let Some(bin) = serf::bin() {
        let sc = tokio::task::block_in_place(|| serf::SerfCluster::start(&bin, n, "res"));
        tokio::time::sleep(Duration::from_secs(2)).await;
        let theirs = tokio::task::block_in_place(|| idle_cost(&sc.pids(), window, background));
        println!("{}", line("serf", theirs));
    }
}

/// `--only NAME[,NAME]` runs just those figures (join, join_seed, converge_seed, join_secret,
/// lifecycle, peers, automation, silent_loss, idle; with `--sizes`: converge, lifecycle, peers,
/// silent_loss, idle); `--quick` fewer sizes and runs. With `SERF_BIN` set, each figure Serf
/// shares is measured for Serf too, in the same run.
#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let only: Option<Vec<String>> = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .map(|v| v.split(',').map(String::from).collect());
    let want = |name: &str| only.as_ref().is_none_or(|o| o.iter().any(|x| x == name));
    if let Some(o) = scale::Opts::parse(&args, quick) {
        // `--sizes` (with `--max-links`, ...): the figures against N only.
        scale::run(&o).await;
        return;
    }
    let (sizes, runs): (&[usize], usize) = if quick {
        (&[4, 16], 3)
    } else {
        (&[4, 16, 32, 64], 5)
    };
    // Failure detection is measured at 16 and 32 nodes (16 only when quick).
    if want("join") {
        for &n in sizes {
            join_bench(n, runs).await;
        }
    }
    if want("join_seed") {
        join_seed_bench(if quick { 16 } else { 32 }, runs).await;
    }
    if want("converge_seed") {
        converge_seed_bench(if quick { 16 } else { 32 }, runs).await;
    }
    if want("join_secret") {
        join_secret_bench(16, runs).await;
    }
    if want("lifecycle") {
        for &n in sizes.iter().filter(|&&n| (16..=32).contains(&n)) {
            lifecycle(n, runs).await;
        }
    }
    if want("peers") {
        let n = if quick { 16 } else { 32 };
        peers_and_broadcast(n, if quick { 10 } else { 20 }, runs).await;
    }
    if want("automation") {
        automation(16, if quick { 5 } else { 10 }).await;
    }
    if want("silent_loss") {
        silent_loss(16, runs).await;
    }
    if want("idle") {
        let (n, secs) = if quick { (16, 5) } else { (32, 20) };
        resources(n, Duration::from_secs(secs)).await;
    }
}

/// Waits (60 s at most) until every node of `c` lists all others linked.
async fn wait_mesh(c: &Cluster) {
    let n = c.nodes.len();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut all = true;
        for (_, sock, _) in &c.nodes {
            if linked(sock).await != n - 1 {
                all = false;
                break;
            }
        }
        if all {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "cluster of {n} did not mesh in 60 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runtime tags and queries at `n` nodes (see the module docs).
async fn automation(n: usize, runs: usize) {
    // Every node answers `bench` queries with a `cat` handler.
    let c = start_cluster_args(n, "auto", false, &["--handler", "query:bench=/bin/cat"]).await;
    let all = sockets(&c);
    let s1 = all[0].clone();
    let client = Client::new(&s1);
    let (mut rx, _tasks) = subscribe(&all[1..]).await;
    let (mut tags, mut base) = (Vec::new(), Vec::new());
    for r in 0..runs {
        base.push(message_ms(&client, &mut rx, Value::Null, &format!("t{r}"), n - 1).await);
        let value = format!("v{r}");
        let t0 = SystemTime::now();
        let body = json!({"set": {"bench": value}});
        let answer = client
            .send(Method::PATCH, "/v1/self/tags", Some(&body))
            .await
            .expect("patch");
        assert!(answer.status.is_success(), "{}", answer.error_message());
        let last = latest(&mut rx, n - 1, |v| {
            v["type"] == "peer_updated"
                && v["peer"]["name"] == "b1"
                && v["peer"]["tags"]["bench"] == value
        })
        .await;
        tags.push(ms_since(t0, last));
    }
    report(
        "tags_change",
        json!({"n": n, "seen_by": n - 1, "system": "constellationd"}),
        tags,
        "broadcast message to the same nodes",
        base.clone(),
    );

    let mut xs = Vec::new();
    for r in 0..runs {
        xs.push(query_ms(&client, "bench", &format!("q{r}"), n).await);
    }
    report(
        "query",
        json!({"n": n, "answered": n, "answerer": "handler query:bench=/bin/cat", "system": "constellationd"}),
        xs,
        "broadcast message to the same nodes",
        base.clone(),
    );

    // The same with answerers that are programs following /v1/events,
    // echoing the payload back over the API.
    let (mut qrx, _qtasks) = subscribe(&all).await;
    let answer_socks = all.clone();
    let answerer = tokio::spawn(async move {
        while let Some((i, v)) = qrx.recv().await {
            if v["type"] != "query" || v["name"] != "bench_api" {
                continue;
            }
            let id = v["id"].as_str().unwrap_or("").to_string();
            let body = json!({"payload": v["payload"]});
            let c = Client::new(&answer_socks[i]);
            tokio::spawn(async move {
                let _ = c
                    .post(&format!("/v1/queries/{id}/responses"), Some(&body))
                    .await;
            });
        }
    });
    let mut xs = Vec::new();
    for r in 0..runs {
        xs.push(query_ms(&client, "bench_api", &format!("q{r}"), n).await);
    }
    answerer.abort();
    report(
        "query_api_answerer",
        json!({"n": n, "answered": n, "answerer": "a program following /v1/events, echoing", "system": "constellationd"}),
        xs,
        "broadcast message to the same nodes",
        base,
    );
}

/// One query `name` with `payload` asked through `client`: ms from the
/// POST until its `done` line, which must count `n` answers, each the
/// payload.
async fn query_ms(client: &Client, name: &str, payload: &str, n: usize) -> f64 {
    {
        let t0 = Instant::now();
        let body = json!({"name": name, "payload": payload, "timeout_ms": 5000});
        let bytes = serde_json::to_vec(&body).expect("json");
        let resp = client
            .request(Method::POST, "/v1/queries", bytes.into())
            .await
            .expect("query");
        let mut stream = resp.into_body();
        let mut buf = Vec::new();
        let mut done = Value::Null;
        while let Some(Ok(frame)) = stream.frame().await {
            if let Ok(data) = frame.into_data() {
                buf.extend_from_slice(&data);
            }
            while let Some(pos) = buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = buf.drain(..=pos).collect();
                let v: Value = serde_json::from_slice(&line).unwrap_or_default();
                if v["type"] == "answer" {
                    assert_eq!(v["payload"], payload, "an echo: {v}");
                }
                if v["type"] == "done" {
                    done = v;
                }
            }
        }
        assert_eq!(done["answered"], json!(n), "every node answered: {done}");
        t0.elapsed().as_secs_f64() * 1000.0
    }
}
