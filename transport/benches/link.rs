//! Link throughput and latency on loopback, one JSON line per figure, each
//! beside its baseline measured in the same run (and the ratio).
//!
//! `cargo bench -p constellation-transport --bench link [-- --quick]`
//! (`-- --profile-64B` or `-- --profile-64KiB` runs only our link's stream
//! of that payload size, silently, to be watched by a profiler).
//!
//! The path measured is the transport's public API, the one every
//! application message takes (`POST /v1/messages` ends in it): a
//! `LinkHandle::send_app` on one node, the link's writer task, TCP, the
//! peer's reader task, and a `TransportEvent::Messages` on its event
//! channel, whose messages the consumer takes one by one.
//! The baseline is the least a Rust program can do for the same bytes: a
//! raw `tokio_util` `Framed` pair with a length-delimited codec over the same
//! loopback TCP, writes batched as our writer batches them. In both, each
//! end runs on a thread of its own with a single-threaded runtime, as each
//! node runs in its own single-threaded process.
//!
//! - `msgs_64B`: messages per second, 64-byte payloads.
//! - `mb_64KiB`: MB/s (10^6 bytes of payload), 64 KiB payloads.
//! - `rtt`: round trip of a 64-byte message echoed by the peer, p50 and p99.
//!
//! The streams also report each end's CPU time per message
//! (`cpu_ns_per_msg`, from the thread's own run time), and
//! `cpu_ratio_to_baseline`: the baseline's busier end against ours, the
//! throughput ratio of a machine where each end has a core to itself. On a
//! machine shared with other work the wall-clock ratio swings with what
//! else runs; this one much less.
//!
//! Each is measured without and with a cluster secret (Noise handshake,
//! ChaCha20-Poly1305 on every frame); the secured figure is also reported
//! against the plaintext one.

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use proto::frame::{AppMessage, VERSION};
use proto::secure::{Key, Keyring};
use proto::{Hello, NodeId};
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::codec::{Framed, LengthDelimitedCodec};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use transport::{Config, LinkHandle, Transport, TransportEvent};

const WAIT: Duration = Duration::from_secs(10);
/// Our link writer's batch, reused by the baseline for fairness.
const BATCH: usize = 64;

struct Node {
    transport: Transport,
    events: mpsc::Receiver<TransportEvent>,
    id: NodeId,
    addr: SocketAddr,
    cancel: CancellationToken,
    /// Messages of the last batch not yet taken.
    pending: std::vec::IntoIter<AppMessage>,
}

async fn node(name: &str, key: Option<&Key>) -> Node {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let id = NodeId::random();
    let hello = Hello {
        protocol: VERSION,
        cluster: "bench".into(),
        id,
        incarnation: 1,
        name: name.into(),
        addr,
        tags: Default::default(),
    };
    let mut cfg = Config::new(hello);
    cfg.max_frame = 1 << 20;
    cfg.keyring = key.map(|k| Arc::new(RwLock::new(Keyring::new(vec![k.clone()]).unwrap())));
    let (tx, events) = mpsc::channel(4096);
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    let transport = Transport::start(listener, cfg, tx, cancel.clone(), &tracker);
    Node {
        transport,
        events,
        id,
        addr,
        cancel,
        pending: Vec::new().into_iter(),
    }
}

fn app(payload: &Bytes) -> AppMessage {
    AppMessage {
        topic: "b".into(),
        payload: payload.clone(),
    }
}

/// CPU time this thread has run, in ns (Linux's `/proc/thread-self/schedstat`;
/// 0 where there is none). A stream's figure on a machine shared with other
/// work: its wall time depends on who else runs, its CPU time much less.
fn thread_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// One stream: its wall time, and the CPU time of each end's thread.
#[derive(Clone, Copy)]
struct Run {
    secs: f64,
    send_cpu_ns: u64,
    recv_cpu_ns: u64,
}

/// Runs `f` on a thread of its own with a single-threaded runtime, as each
/// node runs in its own process with one thread.
fn on_thread<T, F>(f: impl FnOnce() -> F + Send + 'static) -> std::thread::JoinHandle<T>
where
    F: std::future::Future<Output = T>,
    T: Send + 'static,
{
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(f())
    })
}

async fn wait_link(n: &mut Node) {
    loop {
        match tokio::time::timeout(WAIT, n.events.recv()).await {
            Ok(Some(TransportEvent::LinkUp { .. })) => return,
            Ok(Some(_)) => {}
            other => panic!("no link: {other:?}"),
        }
    }
}

async fn next_message(n: &mut Node) -> AppMessage {
    loop {
        if let Some(msg) = n.pending.next() {
            return msg;
        }
        match tokio::time::timeout(WAIT, n.events.recv()).await {
            Ok(Some(TransportEvent::Messages { msgs, .. })) => n.pending = msgs.into_iter(),
            Ok(Some(_)) => {}
            other => panic!("message stream stalled: {other:?}"),
        }
    }
}

/// The two ends of a transport benchmark, each on its own thread: `b` gets
/// node b, `a` gets node a and its link handle to b. Returns what `a`
/// returns.
fn transport_pair<T: Send + 'static>(
    key: Option<Key>,
    b_side: impl FnOnce(Node, LinkHandle) -> futures::future::BoxFuture<'static, ()> + Send + 'static,
    a_side: impl FnOnce(Node, LinkHandle) -> futures::future::BoxFuture<'static, T> + Send + 'static,
) -> T {
    let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
    // b stays up until a is done: its last echo must get out.
    let (fin_tx, fin_rx) = tokio::sync::oneshot::channel::<()>();
    let kb = key.clone();
    let b = on_thread(move || async move {
        let mut b = node("b", kb.as_ref()).await;
        addr_tx.send((b.id, b.addr)).unwrap();
        wait_link(&mut b).await;
        let ba = b.transport.links().await.remove(0).handle;
        let cancel = b.cancel.clone();
        b_side(b, ba).await;
        let _ = fin_rx.await;
        cancel.cancel();
    });
    let a = on_thread(move || async move {
        let mut a = node("a", key.as_ref()).await;
        let (id, addr) = addr_rx.await.unwrap();
        assert!(a.transport.dial(id, addr));
        wait_link(&mut a).await;
        let ab = a.transport.links().await.remove(0).handle;
        let cancel = a.cancel.clone();
        let out = a_side(a, ab).await;
        let _ = fin_tx.send(());
        cancel.cancel();
        out
    });
    let out = a.join().expect("a side");
    b.join().expect("b side");
    out
}

/// Sends `count` messages of `size` bytes a → b: seconds from the first
/// send until b has received the last, and each end's CPU time.
fn transport_stream(key: Option<&Key>, size: usize, count: usize) -> Run {
    let (t0_tx, t0_rx) = std::sync::mpsc::channel::<Instant>();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<(Instant, u64)>();
    let (done, send_cpu_ns) = transport_pair(
        key.cloned(),
        move |mut b, _ba| {
            Box::pin(async move {
                let cpu0 = thread_cpu_ns();
                for _ in 0..count {
                    next_message(&mut b).await;
                }
                let _ = done_tx.send((Instant::now(), thread_cpu_ns() - cpu0));
            })
        },
        move |a, ab| {
            Box::pin(async move {
                let _events_open = a; // its event channel must outlive the stream
                let payload = Bytes::from(vec![0x5a; size]);
                let cpu0 = thread_cpu_ns();
                t0_tx.send(Instant::now()).unwrap();
                for _ in 0..count {
                    ab.send_app(app(&payload), WAIT).await.expect("send");
                }
                let done = done_rx.await.expect("receiver finished");
                (done, thread_cpu_ns() - cpu0)
            })
        },
    );
    Run {
        secs: done.0.duration_since(t0_rx.recv().unwrap()).as_secs_f64(),
        send_cpu_ns,
        recv_cpu_ns: done.1,
    }
}

/// Round trips of a 64-byte message a → b → a; returns each in µs.
fn transport_rtt(key: Option<&Key>, count: usize) -> Vec<f64> {
    transport_pair(
        key.cloned(),
        move |mut b, ba| {
            Box::pin(async move {
                for _ in 0..count {
                    let msg = next_message(&mut b).await;
                    ba.send_app(msg, WAIT).await.expect("echo");
                }
            })
        },
        move |mut a, ab| {
            Box::pin(async move {
                let payload = Bytes::from(vec![0x5a; 64]);
                let mut xs = Vec::with_capacity(count);
                for _ in 0..count {
                    let t0 = Instant::now();
                    ab.send_app(app(&payload), WAIT).await.expect("send");
                    next_message(&mut a).await;
                    xs.push(t0.elapsed().as_secs_f64() * 1e6);
                }
                xs
            })
        },
    )
}

type Raw = Framed<TcpStream, LengthDelimitedCodec>;

fn framed(s: TcpStream) -> Raw {
    s.set_nodelay(true).unwrap();
    let codec = LengthDelimitedCodec::builder()
        .max_frame_length(1 << 20)
        .new_codec();
    Framed::new(s, codec)
}

/// The two ends of a raw baseline, each on its own thread.
fn raw_pair<T: Send + 'static>(
    b_side: impl FnOnce(Raw) -> futures::future::BoxFuture<'static, ()> + Send + 'static,
    a_side: impl FnOnce(Raw) -> futures::future::BoxFuture<'static, T> + Send + 'static,
) -> T {
    let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
    let b = on_thread(move || async move {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        addr_tx.send(listener.local_addr().unwrap()).unwrap();
        let (s, _) = listener.accept().await.unwrap();
        b_side(framed(s)).await;
    });
    let a = on_thread(move || async move {
        let addr: SocketAddr = addr_rx.await.unwrap();
        a_side(framed(TcpStream::connect(addr).await.unwrap())).await
    });
    let out = a.join().expect("a side");
    b.join().expect("b side");
    out
}

/// The baseline stream: feed, flushing every [`BATCH`] frames.
fn raw_stream(size: usize, count: usize) -> Run {
    let (t0_tx, t0_rx) = std::sync::mpsc::channel::<Instant>();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<(Instant, u64)>();
    let (done, send_cpu_ns) = raw_pair(
        move |mut rx| {
            Box::pin(async move {
                let cpu0 = thread_cpu_ns();
                for _ in 0..count {
                    rx.next().await.expect("open").expect("frame");
                }
                let _ = done_tx.send((Instant::now(), thread_cpu_ns() - cpu0));
            })
        },
        move |mut tx| {
            Box::pin(async move {
                let payload = Bytes::from(vec![0x5a; size]);
                let cpu0 = thread_cpu_ns();
                t0_tx.send(Instant::now()).unwrap();
                for i in 0..count {
                    tx.feed(payload.clone()).await.unwrap();
                    if i % BATCH == BATCH - 1 {
                        SinkExt::<Bytes>::flush(&mut tx).await.unwrap();
                    }
                }
                SinkExt::<Bytes>::flush(&mut tx).await.unwrap();
                let done = done_rx.await.expect("receiver finished");
                (done, thread_cpu_ns() - cpu0)
            })
        },
    );
    Run {
        secs: done.0.duration_since(t0_rx.recv().unwrap()).as_secs_f64(),
        send_cpu_ns,
        recv_cpu_ns: done.1,
    }
}

fn raw_rtt(count: usize) -> Vec<f64> {
    raw_pair(
        move |mut b| {
            Box::pin(async move {
                for _ in 0..count {
                    let frame = b.next().await.expect("open").expect("frame");
                    b.send(frame.freeze()).await.expect("echo");
                }
            })
        },
        move |mut a| {
            Box::pin(async move {
                let payload = Bytes::from(vec![0x5a; 64]);
                let mut xs = Vec::with_capacity(count);
                for _ in 0..count {
                    let t0 = Instant::now();
                    a.send(payload.clone()).await.unwrap();
                    a.next().await.expect("open").expect("echo");
                    xs.push(t0.elapsed().as_secs_f64() * 1e6);
                }
                xs
            })
        },
    )
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn pct(xs: &[f64], p: f64) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn r3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn emit(v: Value) {
    println!("{v}");
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let (runs, small, large, rtts) = if quick {
        (3, 50_000, 500, 1_000)
    } else {
        (5, 200_000, 2_000, 5_000)
    };
    let key = Key::generate();
    if std::env::args().any(|a| a == "--profile-64B") {
        // Only our link's 64-byte stream, for a profiler; prints nothing.
        for _ in 0..runs * 4 {
            transport_stream(None, 64, small);
        }
        return;
    }
    if std::env::args().any(|a| a == "--profile-64KiB") {
        for _ in 0..runs * 4 {
            transport_stream(None, 64 << 10, large);
        }
        return;
    }

    // Throughput: alternate the three variants run by run, median of runs.
    for (bench, size, count) in [("msgs_64B", 64usize, small), ("mb_64KiB", 64 << 10, large)] {
        let (mut raw, mut plain, mut secured) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..runs {
            raw.push(raw_stream(size, count));
            plain.push(transport_stream(None, size, count));
            secured.push(transport_stream(Some(&key), size, count));
        }
        let rate = |secs: f64| {
            if size == 64 {
                count as f64 / secs
            } else {
                (size * count) as f64 / secs / 1e6
            }
        };
        let unit = if size == 64 { "msgs_per_s" } else { "mb_per_s" };
        let wall = |runs: &[Run]| rate(median(runs.iter().map(|r| r.secs).collect()));
        // CPU per message of each end (median of runs), and the rate the
        // busier end allows with a core to itself: the throughput a quiet
        // machine shows, whatever else shares this one.
        let cpu = |runs: &[Run]| {
            let per = |f: fn(&Run) -> u64| {
                median(runs.iter().map(|r| f(r) as f64 / count as f64).collect())
            };
            let (send, recv) = (per(|r| r.send_cpu_ns), per(|r| r.recv_cpu_ns));
            (json!({"send": r3(send), "recv": r3(recv)}), send.max(recv))
        };
        let ((raw_cpu, raw_busy), (plain_cpu, plain_busy), (sec_cpu, sec_busy)) =
            (cpu(&raw), cpu(&plain), cpu(&secured));
        let (raw, plain, secured) = (wall(&raw), wall(&plain), wall(&secured));
        emit(json!({
            "bench": format!("link_{bench}"), "unit": unit, "messages": count, "payload_bytes": size, "runs": runs,
            "value": r3(plain), "baseline": "raw tokio Framed TCP pair", "baseline_value": r3(raw),
            "ratio_to_baseline": r3(plain / raw),
            "cpu_ns_per_msg": plain_cpu, "baseline_cpu_ns_per_msg": raw_cpu,
            "cpu_ratio_to_baseline": r3(raw_busy / plain_busy),
        }));
        emit(json!({
            "bench": format!("link_{bench}_secret"), "unit": unit, "messages": count, "payload_bytes": size, "runs": runs,
            "value": r3(secured), "baseline": "the same link without a secret", "baseline_value": r3(plain),
            "ratio_to_baseline": r3(secured / plain),
            "raw_framed_value": r3(raw), "ratio_to_raw": r3(secured / raw),
            "cpu_ns_per_msg": sec_cpu, "cpu_ratio_to_baseline": r3(plain_busy / sec_busy),
        }));
    }

    // Link set-up: from the dial until both ends report the link up.
    let setup = |key: Option<&Key>| -> Vec<f64> {
        (0..if quick { 30 } else { 100 })
            .map(|_| {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    let (mut a, mut b) = (node("a", key).await, node("b", key).await);
                    let t0 = Instant::now();
                    assert!(a.transport.dial(b.id, b.addr));
                    wait_link(&mut a).await;
                    wait_link(&mut b).await;
                    let took = t0.elapsed().as_secs_f64() * 1e6;
                    a.cancel.cancel();
                    b.cancel.cancel();
                    took
                })
            })
            .collect()
    };
    let (plain_setup, secured_setup) = (setup(None), setup(Some(&key)));
    emit(json!({
        "bench": "link_setup_secret", "unit": "us",
        "p50_us": r3(pct(&secured_setup, 0.5)), "p99_us": r3(pct(&secured_setup, 0.99)),
        "baseline": "the same link without a secret", "baseline_p50_us": r3(pct(&plain_setup, 0.5)),
        "baseline_p99_us": r3(pct(&plain_setup, 0.99)),
        "ratio_to_baseline": r3(pct(&secured_setup, 0.5) / pct(&plain_setup, 0.5)),
    }));

    // Latency.
    let raw = raw_rtt(rtts);
    let plain = transport_rtt(None, rtts);
    let secured = transport_rtt(Some(&key), rtts);
    for (bench, xs, base_name, base) in [
        ("link_rtt", &plain, "raw tokio Framed TCP pair", &raw),
        (
            "link_rtt_secret",
            &secured,
            "the same link without a secret",
            &plain,
        ),
    ] {
        emit(json!({
            "bench": bench, "unit": "us", "round_trips": rtts, "payload_bytes": 64,
            "p50_us": r3(pct(xs, 0.5)), "p99_us": r3(pct(xs, 0.99)),
            "baseline": base_name, "baseline_p50_us": r3(pct(base, 0.5)), "baseline_p99_us": r3(pct(base, 0.99)),
            "ratio_to_baseline": r3(pct(xs, 0.5) / pct(base, 0.5)),
        }));
    }
}
