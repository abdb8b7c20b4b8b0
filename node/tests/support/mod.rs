//! Shared helpers for the node's tests: unique multicast groups, polling
//! with a deadline, and child processes that are killed on drop.
#![allow(dead_code)] // each test binary uses a different subset

pub mod multicast;
pub mod netns;

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

/// A fresh cluster key from `constellationd keygen` (base64).
pub fn keygen() -> String {
    let out = Command::new(bin()).arg("keygen").output().expect("keygen");
    assert!(out.status.success(), "keygen failed");
    String::from_utf8(out.stdout)
        .expect("a base64 key")
        .trim()
        .to_string()
}

/// Writes a secret file of `keys` (one per line) with mode 0600 into `dir`;
/// returns its path.
pub fn secret_file(dir: &Path, name: &str, keys: &[&str]) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(format!("{name}.key"));
    std::fs::write(&path, keys.join("\n") + "\n").expect("secret file");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod 600");
    path
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
        Daemon::start_logging(dir, name, group, extra, "debug")
    }

    /// [`Daemon::start`] with `RUST_LOG=log` (many nodes on one host log
    /// less than `debug`).
    pub fn start_logging(
        dir: &Path,
        name: &str,
        group: &str,
        extra: &[&str],
        rust_log: &str,
    ) -> Daemon {
        let socket = dir.join(format!("{name}.sock"));
        let log = dir.join(format!("{name}.log"));
        let logf = std::fs::File::create(&log).expect("log file");
        let mut args = loopback_args(name, group, &socket);
        if extra.contains(&"--listen") {
            // The caller's --listen (a fixed, allocated port) replaces ours.
            if let Some(i) = args.iter().position(|a| a == "--listen") {
                args.drain(i..i + 2);
            }
        }
        let child = Command::new(bin())
            .args(args)
            .args(extra)
            .env("RUST_LOG", rust_log)
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

/// Resident memory of process `pid` in KiB (`VmRSS` in `/proc/PID/status`).
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// CPU time (user + system) of process `pid`, in clock ticks (`/proc/PID/stat`).
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the `(comm)`, which may hold spaces: state is field 3,
    // utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    n(11) + n(12)
}

/// One HTTP/1.1 request on the control socket with a plain std client
/// (`Connection: close`); returns (status code, body). Status 0 when the
/// daemon closed the connection without an answer.
pub fn http(socket: &Path, method: &str, uri: &str, body: &[u8]) -> (u16, String) {
    use std::io::{Read, Write};
    let Ok(mut s) = std::os::unix::net::UnixStream::connect(socket) else {
        return (0, String::new());
    };
    // Generous: the daemon under test may be busy, never silent this long.
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let head = format!(
        "{method} {uri} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    if s.write_all(head.as_bytes())
        .and_then(|()| s.write_all(body))
        .is_err()
    {
        return (0, String::new());
    }
    let mut out = Vec::new();
    let _eof_or_reset = s.read_to_end(&mut out); // what arrived is what counts
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// `GET /v1/self`, parsed (`Null` if the daemon does not answer).
pub fn self_info(socket: &Path) -> serde_json::Value {
    let (_, body) = http(socket, "GET", "/v1/self", b"");
    serde_json::from_str(&body).unwrap_or_default()
}

/// A raw `/v1/events` subscription: the caller decides when (and whether)
/// to read, which the CLI's `watch` cannot do.
pub struct EventStream {
    reader: std::io::BufReader<std::os::unix::net::UnixStream>,
    pending: Vec<u8>,
}

impl EventStream {
    /// Connects and reads the response head (so the subscription exists
    /// when this returns); `Err` with the status line if it was refused.
    pub fn open(socket: &Path) -> Result<EventStream, String> {
        use std::io::{BufRead, Write};
        let mut s = std::os::unix::net::UnixStream::connect(socket).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        s.write_all(b"GET /v1/events HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .map_err(|e| e.to_string())?;
        let mut reader = std::io::BufReader::new(s);
        let mut status = String::new();
        reader.read_line(&mut status).map_err(|e| e.to_string())?;
        if !status.starts_with("HTTP/1.1 200") {
            return Err(status);
        }
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).map_err(|e| e.to_string())? == 0 {
                return Err("closed in the head".into());
            }
            if h == "\r\n" {
                break;
            }
        }
        Ok(EventStream {
            reader,
            pending: Vec::new(),
        })
    }

    /// The next event line (chunked encoding undone), parsed; `None` at the
    /// end of the stream or after the read timeout.
    pub fn next(&mut self) -> Option<serde_json::Value> {
        use std::io::{BufRead, Read};
        loop {
            if let Some(pos) = self.pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=pos).collect();
                return serde_json::from_slice(&line).ok();
            }
            let mut size = String::new();
            if self.reader.read_line(&mut size).ok()? == 0 {
                return None;
            }
            let n = usize::from_str_radix(size.trim(), 16).ok()?;
            if n == 0 {
                return None;
            }
            let mut chunk = vec![0; n + 2];
            self.reader.read_exact(&mut chunk).ok()?;
            self.pending.extend_from_slice(&chunk[..n]);
        }
    }

    /// The underlying socket.
    pub fn socket(&self) -> &std::os::unix::net::UnixStream {
        self.reader.get_ref()
    }
}
