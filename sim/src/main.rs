//! `constellation-sim`: runs one scenario (or all) of a simulated cluster
//! and prints one JSON object per scenario on standard output.
//!
//! ```text
//! cargo run -p constellation-sim --release -- --nodes 64 --seconds 30 \
//!     --loss 0.05 --latency-ms 1 --jitter-ms 0.5 --seed 7 --scenario all
//! ```

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use sim::{DaemonFlags, Params, SimConfig, SCENARIOS};

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (e.g. 500ms, 2s)"))
}

fn parse_probability(s: &str) -> Result<f64, String> {
    let p: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if (0.0..=1.0).contains(&p) {
        Ok(p)
    } else {
        Err("a probability is between 0 and 1".into())
    }
}

fn parse_ms(s: &str) -> Result<Duration, String> {
    let ms: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if ms.is_finite() && ms >= 0.0 {
        Ok(Duration::from_secs_f64(ms / 1e3))
    } else {
        Err("milliseconds are a non-negative number".into())
    }
}

/// Simulate a constellationd cluster (today's full mesh) in virtual time.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Number of nodes.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(2..=65_536))]
    nodes: u32,
    /// Virtual seconds per scenario run.
    #[arg(long, default_value_t = 30.0)]
    seconds: f64,
    /// Probability that a packet is lost.
    #[arg(long, default_value = "0", value_parser = parse_probability)]
    loss: f64,
    /// Mean one-way latency, in milliseconds.
    #[arg(long, default_value = "1", value_parser = parse_ms)]
    latency_ms: Duration,
    /// Latency jitter (uniform ±), in milliseconds.
    #[arg(long, default_value = "0.5", value_parser = parse_ms)]
    jitter_ms: Duration,
    /// The seed.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// converge, crash, leave, silent, partition, pause, restart, or all;
    /// or overlay (with --max-links; not part of all).
    #[arg(long, default_value = "all")]
    scenario: String,
    /// Links in the cluster-secret mode (Noise handshake, sealed records).
    #[arg(long)]
    secured: bool,
    /// The daemon's --beacon-interval.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    beacon_interval: Duration,
    /// The daemon's --suspect-after.
    #[arg(long, default_value = "600ms", value_parser = parse_duration)]
    suspect_after: Duration,
    /// The daemon's --dead-after.
    #[arg(long, default_value = "1400ms", value_parser = parse_duration)]
    dead_after: Duration,
    /// How long the partition of `silent` and `partition` lasts.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    partition_for: Duration,
    /// How long the node of `pause` stays paused.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    pause_for: Duration,
    /// Bounded overlay: each node dials only its ring neighbours (about K
    /// links; a full mesh up to K + 1 nodes). With it, `--scenario overlay`
    /// reports what reaches every node without a full mesh.
    #[arg(long, value_parser = clap::value_parser!(u32).range(2..=1024))]
    max_links: Option<u32>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if !(args.seconds.is_finite() && args.seconds > 0.0) {
        eprintln!("constellation-sim: --seconds must be positive");
        return ExitCode::from(2);
    }
    if args.suspect_after >= args.dead_after {
        eprintln!("constellation-sim: --suspect-after must be shorter than --dead-after");
        return ExitCode::from(2);
    }
    let names: Vec<&str> = match args.scenario.as_str() {
        "all" => SCENARIOS.to_vec(),
        one if SCENARIOS.contains(&one) => vec![one],
        "overlay" => vec!["overlay"],
        other => {
            eprintln!(
                "constellation-sim: unknown scenario {other:?} (one of {}, or all)",
                SCENARIOS.join(", ")
            );
            return ExitCode::from(2);
        }
    };
    let cfg = SimConfig {
        loss: args.loss,
        latency: args.latency_ms,
        jitter: args.jitter_ms,
        secured: args.secured,
        flags: DaemonFlags {
            beacon_interval: args.beacon_interval,
            suspect_after: args.suspect_after,
            dead_after: args.dead_after,
            ..DaemonFlags::default()
        },
        max_links: args.max_links.map(|k| k as usize),
        ..SimConfig::new(args.nodes as usize, args.seed)
    };
    let mut params = Params::new(cfg, Duration::from_secs_f64(args.seconds));
    params.partition_for = args.partition_for;
    params.pause_for = args.pause_for;
    for name in names {
        if name == "overlay" {
            println!("{}", sim::scenario::overlay(&params));
            continue;
        }
        match sim::scenario::run(name, &params) {
            Some(report) => match serde_json::to_string(&report) {
                Ok(line) => println!("{line}"),
                Err(e) => {
                    eprintln!("constellation-sim: cannot encode the report: {e}");
                    return ExitCode::from(1);
                }
            },
            None => {
                eprintln!("constellation-sim: scenario {name} could not run");
                return ExitCode::from(1);
            }
        }
    }
    ExitCode::SUCCESS
}
