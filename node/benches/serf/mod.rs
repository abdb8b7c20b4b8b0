//! HashiCorp Serf, measured beside constellationd in the same run.
//!
//! `SERF_BIN` names the `serf` binary (`scripts/bench` fetches Debian's
//! package without installing or starting anything). Every agent binds its
//! gossip and RPC listeners to 127.0.0.1 on ports of its own and joins the
//! first agent by address; mDNS discovery is never used. Agents are
//! children of this process, stopped by PID when their cluster is dropped.
//!
//! Membership is read the way a program would: over each agent's RPC
//! (msgpack over TCP, `members`), polled every few milliseconds, because the
//! agent coalesces member events for its handlers (at least a second of
//! quiet) and would otherwise be measured slower than it is. User events
//! (`serf event -coalesce=false`) are timed by an event handler that stamps
//! `$EPOCHREALTIME` as it starts.

use std::collections::HashMap;
use std::io::{BufReader, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

/// A serf agent process, killed on drop if still running.
pub struct Agent {
    pub name: String,
    pub bind: u16,
    pub rpc: u16,
    pub child: Child,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill(); // ours, by PID; may have exited already
        let _ = self.child.wait();
    }
}

pub struct SerfCluster {
    bin: PathBuf,
    pub dir: PathBuf,
    handler: PathBuf,
    pub agents: Vec<Agent>,
}

impl Drop for SerfCluster {
    fn drop(&mut self) {
        self.agents.clear();
        if std::env::var_os("BENCH_DEBUG").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A port free for both TCP and UDP on 127.0.0.1 (serf binds both).
fn free_port() -> u16 {
    loop {
        let t = TcpListener::bind("127.0.0.1:0").expect("tcp port");
        let port = t.local_addr().unwrap().port();
        if UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

pub fn bin() -> Option<PathBuf> {
    std::env::var_os("SERF_BIN").map(PathBuf::from)
}

#[derive(Serialize)]
struct Request<'a> {
    #[serde(rename = "Command")]
    command: &'a str,
    #[serde(rename = "Seq")]
    seq: u64,
}

#[derive(Serialize)]
struct Handshake {
    #[serde(rename = "Version")]
    version: u32,
}

#[derive(Deserialize)]
struct Header {
    #[serde(rename = "Error", default)]
    error: String,
}

#[derive(Deserialize)]
struct Members {
    #[serde(rename = "Members")]
    members: Vec<Member>,
}

#[derive(Deserialize)]
struct Member {
    #[serde(rename = "Name")]
    name: String,
    #[serde(rename = "Status")]
    status: String,
}

/// A connection to one agent's RPC listener.
pub struct Rpc {
    rd: BufReader<TcpStream>,
    wr: TcpStream,
    seq: u64,
}

impl Rpc {
    pub fn connect(port: u16) -> std::io::Result<Rpc> {
        let s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut rpc = Rpc {
            rd: BufReader::new(s.try_clone()?),
            wr: s,
            seq: 0,
        };
        rpc.call("handshake", Some(&Handshake { version: 1 }))?;
        Ok(rpc)
    }

    fn call<B: Serialize>(&mut self, command: &str, body: Option<&B>) -> std::io::Result<()> {
        let io = |e: String| std::io::Error::other(e);
        let seq = self.seq;
        self.seq += 1;
        let mut out =
            rmp_serde::to_vec_named(&Request { command, seq }).map_err(|e| io(e.to_string()))?;
        if let Some(b) = body {
            out.extend(rmp_serde::to_vec_named(b).map_err(|e| io(e.to_string()))?);
        }
        self.wr.write_all(&out)?;
        let h: Header = rmp_serde::from_read(&mut self.rd).map_err(|e| io(e.to_string()))?;
        if h.error.is_empty() {
            Ok(())
        } else {
            Err(io(h.error))
        }
    }

    /// Name → status of every member this agent knows.
    pub fn members(&mut self) -> std::io::Result<HashMap<String, String>> {
        self.call::<()>("members", None)?;
        let m: Members =
            rmp_serde::from_read(&mut self.rd).map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(m.members.into_iter().map(|m| (m.name, m.status)).collect())
    }
}

impl SerfCluster {
    /// Starts `n` agents (all joining the first) and waits until every one
    /// lists all `n` alive.
    pub fn start(bin: &Path, n: usize, tag: &str) -> SerfCluster {
        let dir = std::env::temp_dir().join(format!("serf-bench-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let handler = dir.join("handler.sh");
        std::fs::write(
            &handler,
            format!(
                "#!/bin/bash\nt=$EPOCHREALTIME\nwhile IFS= read -r line || [[ -n \"$line\" ]]; do\n  printf '%s %s %s %s\\n' \"$t\" \"$SERF_EVENT\" \"${{SERF_USER_EVENT:--}}\" \"$line\"\ndone >> \"{}/$SERF_SELF_NAME.events\"\n",
                dir.display()
            ),
        )
        .expect("handler");
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&handler, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let mut c = SerfCluster {
            bin: bin.to_path_buf(),
            dir,
            handler,
            agents: Vec::new(),
        };
        for i in 1..=n {
            let a = c.spawn(&format!("s{i}"));
            c.agents.push(a);
        }
        let names: Vec<String> = c.agents.iter().map(|a| a.name.clone()).collect();
        let all: Vec<usize> = (0..n).collect();
        c.wait_status(&all, &names, "alive", Duration::from_secs(120))
            .expect("serf cluster converges");
        c
    }

    /// Starts one agent that joins the first agent (if there is one).
    pub fn spawn(&self, name: &str) -> Agent {
        self.spawn_wrapped(name, &[])
    }

    /// Like [`SerfCluster::spawn`], the command prefixed by `wrap` (e.g.
    /// `setpriv` to run it as another user).
    pub fn spawn_wrapped(&self, name: &str, wrap: &[&str]) -> Agent {
        let (bind, rpc) = (free_port(), free_port());
        let mut cmd = match wrap.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(&self.bin);
                c
            }
            None => Command::new(&self.bin),
        };
        cmd.arg("agent")
            .arg(format!("-node={name}"))
            .arg(format!("-bind=127.0.0.1:{bind}"))
            .arg(format!("-rpc-addr=127.0.0.1:{rpc}"))
            .arg(format!("-event-handler={}", self.handler.display()))
            .arg("-log-level=err");
        if let Some(first) = self.agents.first() {
            cmd.arg(format!("-join=127.0.0.1:{}", first.bind));
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn serf agent");
        let deadline = Instant::now() + Duration::from_secs(10);
        while Rpc::connect(rpc).is_err() {
            assert!(
                Instant::now() < deadline,
                "serf agent {name} RPC did not come up"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        Agent {
            name: name.into(),
            bind,
            rpc,
            child,
        }
    }

    /// Polls the agents at `watchers` until each lists every name in `names`
    /// with `status`; returns when each first did (wall clock), or None on
    /// timeout.
    pub fn wait_status(
        &self,
        watchers: &[usize],
        names: &[String],
        status: &str,
        limit: Duration,
    ) -> Option<SystemTime> {
        let mut rpcs: Vec<Option<Rpc>> = watchers.iter().map(|_| None).collect();
        let mut done: Vec<Option<SystemTime>> = watchers.iter().map(|_| None).collect();
        let deadline = Instant::now() + limit;
        while done.iter().any(Option::is_none) {
            if Instant::now() > deadline {
                return None;
            }
            for (k, &i) in watchers.iter().enumerate() {
                if done[k].is_some() {
                    continue;
                }
                if rpcs[k].is_none() {
                    rpcs[k] = Rpc::connect(self.agents[i].rpc).ok();
                }
                let Some(rpc) = rpcs[k].as_mut() else {
                    continue;
                };
                match rpc.members() {
                    Ok(m) => {
                        if names
                            .iter()
                            .all(|n| m.get(n).map(String::as_str) == Some(status))
                        {
                            done[k] = Some(SystemTime::now());
                        }
                    }
                    Err(_) => rpcs[k] = None,
                }
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        done.into_iter().flatten().max()
    }

    /// `serf leave` on agent `i` (graceful), then waits for it to exit.
    pub fn leave(&mut self, i: usize) {
        let out = Command::new(&self.bin)
            .args([
                "leave",
                &format!("-rpc-addr=127.0.0.1:{}", self.agents[i].rpc),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("serf leave");
        assert!(out.success(), "serf leave");
    }

    /// `serf event -coalesce=false NAME PAYLOAD` through agent `i`.
    pub fn event(&self, i: usize, name: &str) {
        let out = Command::new(&self.bin)
            .args([
                "event",
                &format!("-rpc-addr=127.0.0.1:{}", self.agents[i].rpc),
                "-coalesce=false",
                name,
                "x",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("serf event");
        assert!(out.success(), "serf event");
    }

    /// When each agent at `watchers` ran its handler for user event `name`
    /// (the latest of them), waiting up to `limit`.
    pub fn user_event_seen(
        &self,
        watchers: &[usize],
        name: &str,
        limit: Duration,
    ) -> Option<SystemTime> {
        let deadline = Instant::now() + limit;
        loop {
            let mut latest = SystemTime::UNIX_EPOCH;
            let mut all = true;
            for &i in watchers {
                let path = self.dir.join(format!("{}.events", self.agents[i].name));
                let text = std::fs::read_to_string(path).unwrap_or_default();
                let t = text.lines().find_map(|l| {
                    let mut f = l.split(' ');
                    let (t, kind, ev) = (f.next()?, f.next()?, f.next()?);
                    (kind == "user" && ev == name)
                        .then(|| t.parse::<f64>().ok())
                        .flatten()
                });
                match t {
                    Some(secs) => {
                        let at = SystemTime::UNIX_EPOCH + Duration::from_secs_f64(secs);
                        latest = latest.max(at);
                    }
                    None => all = false,
                }
            }
            if all {
                return Some(latest);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Whole-process command of `serf members` against agent `i`.
    pub fn members_cmd(&self, i: usize) -> Command {
        let mut c = Command::new(&self.bin);
        c.args([
            "members",
            &format!("-rpc-addr=127.0.0.1:{}", self.agents[i].rpc),
        ]);
        c
    }

    pub fn pids(&self) -> Vec<u32> {
        self.agents.iter().map(|a| a.child.id()).collect()
    }
}
