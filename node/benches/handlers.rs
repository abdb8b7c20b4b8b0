//! Event handler latency on loopback, one JSON line per figure beside a
//! baseline measured in the same run (and their ratio).
//!
//! `cargo bench -p constellationd --bench handlers [-- --quick]`
//!
//! - `handler_start`: from an event (its `at`, stamped when the node
//!   publishes it) until the handler process runs (the start stamp of
//!   `constellationd handler-log --stamp`, the first thing it does). The
//!   events are messages sent one at a time, each after the previous run
//!   wrote its line, so nothing queues. Baseline: the same program spawned
//!   directly by this bench (from just before `spawn` to its own stamp):
//!   what starting that process costs at all.
//!
//! Both nodes run on interface lo with TTL 0 on a group of their own; every
//! process is killed when the benchmark ends.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime};

use serde_json::{json, Value};

#[path = "../tests/support/mod.rs"]
mod support;

use support::{bin, http, unique_group, wait_until, Daemon, TempDir};

/// The lines of a `handler-log --stamp` file: (stamp, the event's JSON).
fn stamped(file: &Path) -> Vec<(SystemTime, Value)> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (stamp, rest) = l.split_once(' ')?;
            Some((
                humantime::parse_rfc3339(stamp).ok()?,
                serde_json::from_str(rest).unwrap_or(Value::Null),
            ))
        })
        .collect()
}

fn ms(from: SystemTime, to: SystemTime) -> f64 {
    match to.duration_since(from) {
        Ok(d) => d.as_secs_f64() * 1000.0,
        Err(e) => -(e.duration().as_secs_f64() * 1000.0),
    }
}

fn quantiles(mut xs: Vec<f64>) -> (f64, f64, f64, f64) {
    xs.sort_by(f64::total_cmp);
    let at = |q: f64| xs[((xs.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.9), xs[0], xs[xs.len() - 1])
}

fn round(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn report(name: &str, xs: Vec<f64>, base_name: &str, base: Vec<f64>) {
    let runs = xs.len();
    let (p50, p90, min, max) = quantiles(xs);
    let (b50, b90, bmin, bmax) = quantiles(base);
    println!(
        "{}",
        json!({
            "bench": name, "runs": runs, "median_ms": round(p50), "p90_ms": round(p90),
            "min_ms": round(min), "max_ms": round(max),
            "baseline": base_name, "baseline_median_ms": round(b50), "baseline_p90_ms": round(b90),
            "baseline_min_ms": round(bmin), "baseline_max_ms": round(bmax),
            "ratio_to_baseline": round(p50 / b50),
        })
    );
}

fn handler_start(runs: usize) {
    let dir = TempDir::new("bench-handlers");
    let group = unique_group();
    let log = dir.path().join("handled.log");
    let a = Daemon::start(
        dir.path(),
        "a",
        &group,
        &[
            "--handler",
            &format!(
                "message:bench={} handler-log --stamp {}",
                bin(),
                log.display()
            ),
        ],
    );
    let b = Daemon::start(dir.path(), "b", &group, &[]);
    wait_until(Duration::from_secs(30), "a and b linked", || {
        a.linked() == 1 && b.linked() == 1
    });
    let body = br#"{"to": "a", "topic": "bench", "payload": "x"}"#;
    // One warm-up run (page cache, first spawn), not counted.
    for i in 0..=runs {
        assert_eq!(http(&b.socket, "POST", "/v1/messages", body).0, 200);
        wait_until(Duration::from_secs(20), "the handler ran", || {
            stamped(&log).len() > i
        });
    }
    let xs: Vec<f64> = stamped(&log)
        .into_iter()
        .skip(1)
        .map(|(stamp, ev)| {
            let at =
                humantime::parse_rfc3339(ev["at"].as_str().expect("an event")).expect("event time");
            ms(at, stamp)
        })
        .collect();

    let direct = dir.path().join("direct.log");
    let mut base = Vec::new();
    for i in 0..=runs {
        let t0 = SystemTime::now();
        let mut child = Command::new(bin())
            .args(["handler-log", "--stamp"])
            .arg(&direct)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(b"{}\n")
            .expect("feed");
        assert!(child.wait().expect("wait").success());
        let stamp = stamped(&direct).last().expect("a line").0;
        if i > 0 {
            base.push(ms(t0, stamp));
        }
    }
    report("handler_start", xs, "direct_spawn", base);
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    handler_start(if quick { 20 } else { 100 });
}
