//! Shared helpers for the node's tests: unique multicast groups, polling
//! with a deadline, and child processes that are killed on drop.
#![allow(dead_code)] // each test binary uses a different subset

use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A multicast group and port no other test uses: a random group in
/// 239.255.0.0/16 and a port the OS just handed out.
pub fn unique_group() -> String {
    let port = UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .expect("free udp port");
    let r: u16 = rand_u16();
    format!("239.255.{}.{}:{port}", (r >> 8) as u8, (r as u8).max(1))
}

fn rand_u16() -> u16 {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    let mut h = RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    h.finish() as u16
}

/// Polls `cond` every 10 ms until it holds or `limit` passes; returns how
/// long it took, or panics with `what`.
pub fn wait_until(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    loop {
        if cond() {
            return start.elapsed();
        }
        if start.elapsed() > limit {
            panic!("timed out after {limit:?} waiting for: {what}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let p =
            std::env::temp_dir().join(format!("cst-{tag}-{}-{}", std::process::id(), rand_u16()));
        std::fs::create_dir_all(&p).expect("temp dir");
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("CONSTELLATION_KEEP_TEST_DIRS").is_some() {
            eprintln!("kept {}", self.0.display());
            return;
        }
        // Best effort: a leftover directory in /tmp harms nobody.
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `run` arguments for a node that stays on this host: interface lo,
/// multicast TTL 0, a free TCP port on 127.0.0.1, its own group and socket.
pub fn loopback_args(name: &str, group: &str, socket: &Path) -> Vec<std::ffi::OsString> {
    let mut args: Vec<std::ffi::OsString> =
        ["run", "--name", name, "--interface", "lo", "--ttl", "0"]
            .iter()
            .map(Into::into)
            .collect();
    args.extend(
        ["--group", group, "--listen", "127.0.0.1:0", "--socket"]
            .iter()
            .map(Into::into),
    );
    args.push(socket.into());
    args
}

/// The binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_constellationd")
}

/// A daemon process, killed (SIGKILL) on drop if still running.
pub struct Daemon {
    pub child: Child,
    pub name: String,
    pub socket: PathBuf,
    pub log: PathBuf,
}

impl Daemon {
    /// Starts `constellationd run` on loopback (interface lo, TTL 0) with a
    /// socket in `dir`, plus `extra` flags.
    pub fn start(dir: &Path, name: &str, group: &str, extra: &[&str]) -> Daemon {
        let socket = dir.join(format!("{name}.sock"));
        let log = dir.join(format!("{name}.log"));
        let logf = std::fs::File::create(&log).expect("log file");
        let child = Command::new(bin())
            .args(loopback_args(name, group, &socket))
            .args(extra)
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .expect("spawn daemon");
        let d = Daemon {
            child,
            name: name.into(),
            socket,
            log,
        };
        wait_until(Duration::from_secs(10), "control socket", || {
            d.socket.exists()
        });
        d
    }

    /// Runs a CLI subcommand against this daemon.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(bin())
            .args(args)
            .arg("--socket")
            .arg(&self.socket)
            .stdin(Stdio::null())
            .output()
            .expect("run cli")
    }

    /// `peers --json`, parsed.
    pub fn peers(&self) -> Vec<serde_json::Value> {
        let out = self.cli(&["peers", "--json"]);
        if !out.status.success() {
            return Vec::new();
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        v["peers"].as_array().cloned().unwrap_or_default()
    }

    /// Count of peers that are alive with their link up.
    pub fn linked(&self) -> usize {
        self.peers()
            .iter()
            .filter(|p| p["state"] == "alive" && p["link"] == "up")
            .count()
    }

    /// State of the peer named `name`, if listed.
    pub fn state_of(&self, name: &str) -> Option<String> {
        self.peers()
            .into_iter()
            .find(|p| p["name"] == name)
            .and_then(|p| p["state"].as_str().map(String::from))
    }

    /// Sends a signal by PID (only to the child we started).
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill {sig} {}", self.child.id());
    }

    /// Waits for the process to exit; returns its status code.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let start = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                return st.code();
            }
            if start.elapsed() > limit {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // Ours, by PID; it may exit between the check and the kill.
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `curl --unix-socket SOCK` with `args`; returns (status code, body).
pub fn curl(socket: &Path, args: &[&str]) -> (u16, String) {
    let out = Command::new("curl")
        .args([
            "-s",
            "-m",
            "10",
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
            "--unix-socket",
        ])
        .arg(socket)
        .args(args)
        .output()
        .expect("curl must be installed");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}
