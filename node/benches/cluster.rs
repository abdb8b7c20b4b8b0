//! Cluster benchmarks on loopback, printing one JSON line per figure, each
//! beside a baseline measured in the same run (and their ratio).
//!
//! `cargo bench -p constellationd --bench cluster [-- --quick]`
//!
//! - `join`: from spawning node N+1 until every one of the N others reports
//!   its link to it up (the `at` of their `link_up` events), median of runs.
//!   Baseline: whole-process time of `constellationd --version` (what starting
//!   a process costs at all).
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
//! Every node runs on interface lo with TTL 0 on a group of its own; every
//! process is killed when the benchmark ends.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use http_body_util::BodyExt;
use hyper::Method;
use node::client::Client;
use serde_json::{json, Value};
use tokio::sync::mpsc;

#[path = "../tests/support/mod.rs"]
mod support;

const BIN: &str = env!("CARGO_BIN_EXE_constellationd");

/// `BENCH_DEBUG=1` keeps every node's debug log in its cluster directory.
fn keep_logs() -> bool {
    std::env::var_os("BENCH_DEBUG").is_some()
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
    let sock = dir.join(format!("{name}.sock"));
    let mut cmd = Command::new(BIN);
    cmd.args(support::loopback_args(name, group, &sock));
    if let Some(file) = secret {
        cmd.arg("--secret-file").arg(file);
    }
    let child = cmd
        .env("RUST_LOG", if keep_logs() { "debug" } else { "warn" })
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
    match Client::new(sock)
        .json(Method::GET, "/v1/peers?state=alive", None)
        .await
    {
        Ok((_, v)) => v["peers"]
            .as_array()
            .map(|a| a.iter().filter(|p| p["link"] == "up").count())
            .unwrap_or(0),
        Err(_) => 0,
    }
}

async fn start_cluster(n: usize, tag: &str) -> Cluster {
    start_cluster_with(n, tag, false).await
}

/// A cluster of `n` nodes, all with one fresh cluster key when `secured`.
async fn start_cluster_with(n: usize, tag: &str, secured: bool) -> Cluster {
    let dir = std::env::temp_dir().join(format!("cst-bench-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
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
            break;
        }
        assert!(
            Instant::now() < deadline,
            "cluster of {n} did not mesh in 60 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
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
                .request(Method::GET, "/v1/events", None)
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
    let (status, answer) = client
        .json(Method::POST, "/v1/messages", Some(body))
        .await
        .expect("send");
    assert!(status.is_success(), "{answer}");
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
        "ratio_to_baseline": round(med / bmed),
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
        json!({"n": n}),
        xs,
        "process start+exit (constellationd --version)",
        base,
    );
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
        json!({"n": n}),
        xs,
        "curl --unix-socket /v1/peers",
        base,
    );

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
        json!({"n": n, "recipients": n - 1}),
        xs,
        "unicast to one peer",
        base,
    );
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
    report(
        "crash_detection",
        json!({"n": n}),
        crash,
        floor,
        base.clone(),
    );
    report("restart", json!({"n": n}), restart, floor, base.clone());
    report("graceful_leave", json!({"n": n}), leave, floor, base);
}

/// `--only NAME[,NAME]` runs just those figures (join, join_secret,
/// lifecycle, peers); `--quick` fewer sizes and runs.
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
    let (sizes, runs): (&[usize], usize) = if quick {
        (&[4, 16], 3)
    } else {
        (&[4, 16, 32, 64], 5)
    };
    if want("join") {
        for &n in sizes {
            join_bench(n, runs).await;
        }
    }
    if want("join_secret") {
        join_secret_bench(16, runs).await;
    }
    if want("lifecycle") {
        lifecycle(16, runs).await;
    }
    if want("peers") {
        let n = if quick { 16 } else { 32 };
        peers_and_broadcast(n, if quick { 10 } else { 20 }, runs).await;
    }
}
