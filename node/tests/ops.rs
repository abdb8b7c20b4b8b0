//! Running the node like a real daemon, with the real binary: the config
//! file (precedence, bad files, the shipped example), SIGHUP reloads, log
//! level and format, `monitor`, the systemd notification protocol and unit
//! file, completions and man page, exit statuses of `--listen`, the
//! `--socket-mode` warning, beacon warnings (in a network namespace), and
//! `scripts/cluster -h`.

mod support;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;
use support::{bin, http, loopback_args, self_info, unique_group, wait_until, Daemon, TempDir};

const LIMIT: Duration = Duration::from_secs(20);

/// Starts `run` on loopback with `extra` flags and `env`, without the
/// runner's RUST_LOG (so `--log-level` is what counts).
fn spawn(dir: &Path, name: &str, group: &str, extra: &[&str], env: &[(&str, &str)]) -> Daemon {
    let socket = dir.join(format!("{name}.sock"));
    let log = dir.join(format!("{name}.log"));
    let logf = std::fs::File::create(&log).expect("log file");
    let mut cmd = Command::new(bin());
    cmd.args(loopback_args(name, group, &socket))
        .args(extra)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(logf);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().expect("spawn daemon");
    let d = Daemon {
        child,
        name: name.into(),
        socket,
        log,
    };
    wait_until(LIMIT, "control socket", || d.socket.exists());
    d
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).expect("write file");
}

fn get_json(socket: &Path, uri: &str) -> Value {
    let (_, body) = http(socket, "GET", uri, b"");
    serde_json::from_str(&body).unwrap_or_default()
}

/// Every line of `log` parsed as JSON (panics on a line that is not).
fn json_lines(log: &str) -> Vec<Value> {
    log.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

#[test]
fn config_file_precedence_is_flags_then_environment_then_file_then_defaults() {
    let dir = TempDir::new("cfg");
    let cfg = dir.path().join("c.toml");
    write(
        &cfg,
        "name = \"from-file\"\ncluster = \"file-cluster\"\ntag = { role = \"db\", zone = \"a\" }\nlog-format = \"json\"\nlog-level = \"debug\"\n",
    );
    let a = spawn(
        dir.path(),
        "flagname",
        &unique_group(),
        &["--config", cfg.to_str().unwrap()],
        &[
            ("CONSTELLATION_CLUSTER", "env-cluster"),
            ("CONSTELLATION_LOG_LEVEL", "info"),
        ],
    );
    let me = self_info(&a.socket);
    assert_eq!(me["name"], "flagname", "a flag beats the file");
    assert_eq!(
        me["cluster"], "env-cluster",
        "the environment beats the file"
    );
    assert_eq!(me["tags"]["role"], "db", "the file beats the default: {me}");
    assert_eq!(me["tags"]["zone"], "a");
    let mode = std::fs::metadata(&a.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(
        mode, 0o600,
        "the default applies where nobody says otherwise"
    );
    let level = get_json(&a.socket, "/v1/log-level");
    assert_eq!(
        level["level"], "info",
        "the environment beats the file: {level}"
    );
    assert_eq!(level["format"], "json", "from the file: {level}");
    // --log-format json from the file: every line on standard error is JSON.
    wait_until(LIMIT, "node started logged", || {
        a.log_text().contains("node started")
    });
    let lines = json_lines(&a.log_text());
    let started = lines
        .iter()
        .find(|l| l["fields"]["message"] == "node started")
        .expect("node started line");
    assert_eq!(started["level"], "INFO");
    assert_eq!(started["fields"]["name"], "flagname");
    assert!(started["timestamp"]
        .as_str()
        .is_some_and(|t| t.ends_with('Z')));
}

#[test]
fn a_bad_config_file_exits_2_with_one_line_before_anything_binds() {
    let dir = TempDir::new("badcfg");
    let cfg = dir.path().join("bad.toml");
    let socket = dir.path().join("x.sock");
    let group = unique_group();
    for (text, key) in [
        ("beacon_interval = \"2s\"\n", "beacon_interval"),
        ("ttl = 300\n", "ttl"),
        ("socket-mode = 660\n", "socket-mode"),
        ("tag = [\"no-equals\"]\n", "tag"),
    ] {
        write(&cfg, text);
        let out = Command::new(bin())
            .args(loopback_args("bad", &group, &socket))
            .args(["--config", cfg.to_str().unwrap()])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{text:?}: {err}");
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        assert!(
            err.contains(&format!("`{key}`")) && err.contains(cfg.to_str().unwrap()),
            "names the key and the file: {err}"
        );
        assert!(!socket.exists(), "nothing was bound");
    }
    let out = Command::new(bin())
        .args(loopback_args("bad", &group, &socket))
        .args(["--config", "/nonexistent/constellationd.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read it"));
}

/// The packaged example parses as is, every `run` flag is in it, and each
/// commented example value is valid too.
#[test]
fn the_packaged_example_config_parses_with_every_key() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/constellationd.toml");
    let text = std::fs::read_to_string(&path).expect("packaging/constellationd.toml");
    let load = |p: &Path| {
        node::configfile::load(["constellationd", "run", "--config", p.to_str().unwrap()])
            .map_err(|e| e.to_string())
    };
    let loaded = load(&path).expect("the example parses");
    assert!(loaded.source.is_some());
    let help = Command::new(bin())
        .args(["run", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    let keys: Vec<&str> = help
        .lines()
        .filter_map(|l| l.trim().strip_prefix("--"))
        .filter_map(|l| l.split([' ', '=']).next())
        .filter(|k| !["config", "help", "version"].contains(k))
        .collect();
    assert!(keys.len() >= 19, "{keys:?}");
    let dir = TempDir::new("example");
    let all = dir.path().join("all.toml");
    let uncommented: String = text
        .lines()
        .map(|l| match l.strip_prefix("# ") {
            Some(rest) if keys.iter().any(|k| rest.starts_with(&format!("{k} = "))) => rest,
            _ => l,
        })
        .map(|l| format!("{l}\n"))
        .collect();
    for k in &keys {
        assert!(
            uncommented
                .lines()
                .any(|l| l.starts_with(&format!("{k} = "))),
            "key {k} is not in the example"
        );
    }
    write(&all, &uncommented);
    load(&all).expect("every example value is valid");
}

#[test]
fn sighup_reloads_the_log_level_and_tags_names_what_needs_a_restart_and_keeps_links() {
    let dir = TempDir::new("reload");
    let group = unique_group();
    let cfg = dir.path().join("a.toml");
    write(&cfg, "log-level = \"info\"\ntag = { role = \"db\" }\n");
    let mut a = spawn(
        dir.path(),
        "a",
        &group,
        &["--config", cfg.to_str().unwrap()],
        &[],
    );
    let b = spawn(dir.path(), "b", &group, &[], &[]);
    wait_until(LIMIT, "a and b linked", || {
        a.linked() == 1 && b.linked() == 1
    });
    let before = self_info(&b.socket);
    let inc_before = b.peers()[0]["incarnation"].clone();
    assert_eq!(b.peers()[0]["tags"]["role"], "db");
    let mut events = support::EventStream::open(&b.socket).expect("subscribe");

    write(
        &cfg,
        "log-level = \"debug\"\ntag = { role = \"web\" }\nbeacon-interval = \"2s\"\n",
    );
    a.signal("-HUP");
    wait_until(LIMIT, "reload logged", || {
        a.log_text().contains("config reloaded")
    });
    let log = a.log_text();
    assert!(log.contains("log-level=debug"), "{log}");
    assert!(log.contains("tag=role=web"), "{log}");
    let warned = log
        .lines()
        .find(|l| l.contains("only take effect at the next restart"))
        .unwrap_or_else(|| panic!("restart warning: {log}"));
    assert!(
        warned.contains("WARN") && warned.contains("beacon-interval") && !warned.contains("tag"),
        "{warned}"
    );
    // The new tags reach b live, as an update of a, and nothing else
    // happens to a on the way.
    let mut seen = Vec::new();
    loop {
        let e = events
            .next()
            .unwrap_or_else(|| panic!("stream ended before peer_updated: {seen:?}"));
        let hit = e["type"] == "peer_updated" && e["peer"]["tags"]["role"] == "web";
        seen.push(e);
        if hit {
            break;
        }
    }
    for e in &seen {
        assert!(
            ![
                "link_down",
                "link_up",
                "peer_restarted",
                "peer_failed",
                "peer_left"
            ]
            .contains(&e["type"].as_str().unwrap_or_default()),
            "{seen:?}"
        );
    }
    assert_eq!(b.peers()[0]["tags"]["role"], "web");
    assert_eq!(get_json(&a.socket, "/v1/log-level")["level"], "debug");
    assert_eq!(a.wait_exit(Duration::ZERO), None, "still running");

    // A file that no longer parses changes nothing, and says why.
    write(&cfg, "log-level = [\n");
    a.signal("-HUP");
    wait_until(LIMIT, "failed reload logged", || {
        a.log_text().contains("config reload failed")
    });
    let log = a.log_text();
    let failed = log
        .lines()
        .find(|l| l.contains("config reload failed"))
        .unwrap();
    assert!(
        failed.contains("keeping the running configuration") && failed.contains("not valid TOML"),
        "{failed}"
    );
    assert_eq!(get_json(&a.socket, "/v1/log-level")["level"], "debug");
    assert_eq!(a.wait_exit(Duration::ZERO), None, "still running");

    // Links stayed up: b never saw a restart, a failure or a new link.
    let after = self_info(&b.socket);
    assert_eq!(b.linked(), 1);
    assert_eq!(b.peers()[0]["incarnation"], inc_before, "no restart");
    assert_eq!(
        after["counters"]["links_established"], before["counters"]["links_established"],
        "no link flap"
    );
    let t = &after["transitions"];
    for kind in ["peer_restarted", "peer_suspect", "peer_failed", "peer_left"] {
        assert!(t.get(kind).is_none(), "{kind}: {t}");
    }
}

#[test]
fn sighup_without_a_config_file_is_logged_and_ignored() {
    let dir = TempDir::new("hupnocfg");
    let mut a = spawn(dir.path(), "a", &unique_group(), &[], &[]);
    a.signal("-HUP");
    wait_until(LIMIT, "SIGHUP logged", || {
        a.log_text().contains("no --config file to reload")
    });
    assert_eq!(a.wait_exit(Duration::ZERO), None, "still running");
    assert_eq!(self_info(&a.socket)["name"], "a");
}

#[test]
fn log_level_changes_at_runtime_and_monitor_streams_at_its_own_level() {
    let dir = TempDir::new("monitor");
    let a = spawn(
        dir.path(),
        "a",
        &unique_group(),
        &["--log-level", "warn"],
        &[],
    );
    let out = a.cli(&["log-level"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("level:    warn"));

    let mut mon = Command::new(bin())
        .args(["monitor", "--level", "debug", "--json", "--socket"])
        .arg(&a.socket)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel::<String>();
    let stdout = mon.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let first: Value = serde_json::from_str(&rx.recv_timeout(LIMIT).unwrap()).unwrap();
    assert_eq!(first["type"], "subscribed");
    assert_eq!(first["level"], "debug");
    wait_until(LIMIT, "monitor counted", || {
        get_json(&a.socket, "/v1/log-level")["monitors"] == 1
    });

    // An info line while the node logs at warn: the monitor (debug) has it,
    // standard error does not.
    let out = a.cli(&["log-level", "error"]);
    assert!(out.status.success(), "{out:?}");
    let changed = loop {
        let line = rx.recv_timeout(LIMIT).expect("a log line on the monitor");
        let v: Value = serde_json::from_str(&line).expect("JSON line");
        if v["fields"]["message"] == "log level changed over the control socket" {
            break v;
        }
    };
    assert_eq!(changed["level"], "INFO");
    assert_eq!(changed["fields"]["to"], "error");
    assert!(!a.log_text().contains("log level changed"));
    assert_eq!(get_json(&a.socket, "/v1/log-level")["level"], "error");

    let out = a.cli(&["log-level", "loud"]);
    assert_eq!(out.status.code(), Some(2), "clap refuses the level");
    let (st, body) = http(&a.socket, "PUT", "/v1/log-level", br#"{"level":"loud"}"#);
    assert_eq!(st, 400, "{body}");
    let _ = mon.kill(); // ours; it may have exited
    let _ = mon.wait();
    wait_until(LIMIT, "monitor gone", || {
        get_json(&a.socket, "/v1/log-level")["monitors"] == 0
    });
}

#[test]
fn rust_log_wins_at_start_and_its_module_filters_survive_a_level_change() {
    let dir = TempDir::new("rustlog");
    let a = spawn(
        dir.path(),
        "a",
        &unique_group(),
        &["--log-level", "debug"],
        &[("RUST_LOG", "warn,transport=trace")],
    );
    let v = get_json(&a.socket, "/v1/log-level");
    assert_eq!(v["level"], "warn", "{v}");
    assert_eq!(v["filter"], "warn,transport=trace");
    let (st, body) = http(&a.socket, "PUT", "/v1/log-level", br#"{"level":"info"}"#);
    assert_eq!(st, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["filter"], "info,transport=trace", "{v}");
}

/// A monitor that never reads loses lines (counted) and the node keeps
/// answering.
#[test]
fn a_stuck_monitor_drops_lines_and_never_slows_the_node() {
    use std::io::Write;
    let dir = TempDir::new("stuckmon");
    let a = spawn(dir.path(), "a", &unique_group(), &[], &[]);
    let mut stuck = std::os::unix::net::UnixStream::connect(&a.socket).unwrap();
    stuck
        .write_all(b"GET /v1/monitor?level=info HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    wait_until(LIMIT, "monitor counted", || {
        get_json(&a.socket, "/v1/log-level")["monitors"] == 1
    });
    // Each change logs one info line (~250 bytes): far more than the
    // backlog (1024 lines) and the socket buffers hold together.
    let mut slowest = Duration::ZERO;
    let mut n = 0;
    while get_json(&a.socket, "/v1/log-level")["monitor_lines_dropped"] == 0 {
        assert!(n < 20_000, "no line dropped after {n} lines");
        let level = if n % 2 == 0 { "debug" } else { "info" };
        let t = std::time::Instant::now();
        let (st, _) = http(
            &a.socket,
            "PUT",
            "/v1/log-level",
            format!("{{\"level\":\"{level}\"}}").as_bytes(),
        );
        assert_eq!(st, 200);
        slowest = slowest.max(t.elapsed());
        n += 1;
    }
    assert!(n > 1024, "dropped only past the backlog ({n})");
    assert!(
        slowest < Duration::from_secs(5),
        "slowest answer {slowest:?}"
    );
    drop(stuck);
}

fn recv_text(sock: &UnixDatagram) -> Option<String> {
    let mut buf = [0u8; 4096];
    let n = sock.recv(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
}

#[test]
fn notify_sends_ready_watchdog_reloading_and_stopping_in_order() {
    let dir = TempDir::new("notify");
    let path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(LIMIT)).unwrap();
    let cfg = dir.path().join("c.toml");
    write(&cfg, "log-level = \"info\"\n");
    let mut a = spawn(
        dir.path(),
        "a",
        &unique_group(),
        &["--config", cfg.to_str().unwrap()],
        &[
            ("NOTIFY_SOCKET", path.to_str().unwrap()),
            ("WATCHDOG_USEC", "400000"),
        ],
    );
    let ready = recv_text(&sock).expect("a datagram");
    assert!(ready.lines().any(|l| l == "READY=1"), "first: {ready:?}");
    assert!(
        a.socket.exists(),
        "the control socket is up when READY=1 arrives"
    );
    assert!(ready.contains("STATUS="), "{ready:?}");
    let ping = recv_text(&sock).expect("a watchdog ping");
    assert_eq!(ping.trim(), "WATCHDOG=1");

    a.signal("-HUP");
    let mut seen = Vec::new();
    while !seen.iter().any(|d: &String| d.contains("READY=1")) {
        seen.push(recv_text(&sock).expect("reload datagrams"));
    }
    let reloading = seen.iter().position(|d| d.contains("RELOADING=1"));
    let ready_again = seen.iter().position(|d| d.contains("READY=1"));
    assert!(reloading.is_some() && reloading < ready_again, "{seen:?}");
    assert!(seen[reloading.unwrap()].contains("MONOTONIC_USEC="));

    let out = a.cli(&["leave"]);
    assert!(out.status.success());
    let stopping = loop {
        let d = recv_text(&sock).expect("STOPPING=1");
        if d != "WATCHDOG=1\n" {
            break d;
        }
    };
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping:?}");
    assert_eq!(a.wait_exit(LIMIT), Some(0));
}

#[test]
fn the_unit_file_passes_systemd_analyze_verify() {
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/constellationd.service");
    let text = std::fs::read_to_string(&unit).expect("packaging/constellationd.service");
    for key in [
        "Type=notify",
        "DynamicUser=yes",
        "RuntimeDirectory=constellationd",
        "StateDirectory=constellationd",
        "ProtectSystem=strict",
        "CapabilityBoundingSet=\n",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "--socket /run/constellationd/constellationd.sock",
    ] {
        assert!(text.contains(key), "the unit has {key:?}");
    }
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipped: systemd-analyze not installed (Debian package `systemd`)");
        return;
    }
    let dir = TempDir::new("unit");
    let copy = dir.path().join("constellationd.service");
    // The binary under test stands in for /usr/bin/constellationd.
    write(&copy, &text.replace("/usr/bin/constellationd", bin()));
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&copy)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    let about_ours: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("constellationd.service"))
        .collect();
    assert!(out.status.success(), "{err}");
    assert!(about_ours.is_empty(), "warnings: {about_ours:?}");
}

#[test]
fn bash_completion_loads_and_completes_subcommands_and_flags() {
    let out = Command::new(bin())
        .args(["completions", "bash"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let dir = TempDir::new("compl");
    let script = dir.path().join("constellationd.bash");
    std::fs::write(&script, &out.stdout).unwrap();
    let complete = |words: &[&str]| -> Vec<String> {
        let line = words.join(" ");
        let shell = format!(
            "source {script} || exit 9\n\
             COMP_WORDS=({words}); COMP_CWORD={cword}; COMP_LINE='{line}'; COMP_POINT=${{#COMP_LINE}}\n\
             _constellationd constellationd '{last}' '{prev}'\n\
             printf '%s\\n' \"${{COMPREPLY[@]}}\"",
            script = script.display(),
            words = words.join(" "),
            cword = words.len() - 1,
            last = words[words.len() - 1],
            prev = words[words.len().saturating_sub(2)],
        );
        let out = Command::new("bash")
            .args(["--norc", "--noprofile", "-c", &shell])
            .output()
            .expect("bash");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(String::from)
            .collect()
    };
    let subs = complete(&["constellationd", "pe"]);
    assert_eq!(subs, vec!["peers"], "{subs:?}");
    let subs = complete(&["constellationd", "mo"]);
    assert!(subs.contains(&"monitor".to_string()), "{subs:?}");
    let flags = complete(&["constellationd", "run", "--log-f"]);
    assert!(flags.contains(&"--log-format".to_string()), "{flags:?}");
    let values = complete(&["constellationd", "run", "--log-format", ""]);
    assert!(
        values.contains(&"json".to_string()) && values.contains(&"text".to_string()),
        "{values:?}"
    );
    for shell in ["zsh", "fish"] {
        let out = Command::new(bin())
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(out.status.success() && out.stdout.len() > 100, "{shell}");
    }
}

#[test]
fn man_pages_come_from_the_same_definitions() {
    let out = Command::new(bin()).arg("man").output().unwrap();
    assert!(out.status.success());
    let page = String::from_utf8_lossy(&out.stdout);
    assert!(
        page.starts_with(".ie") || page.contains(".TH constellationd"),
        "{page}"
    );
    assert!(
        page.contains("log\\-level") && page.contains("monitor"),
        "subcommands listed"
    );
    let out = Command::new(bin()).args(["man", "run"]).output().unwrap();
    let page = String::from_utf8_lossy(&out.stdout);
    assert!(
        page.contains("constellationd\\-run") && page.contains("\\-\\-config"),
        "{page}"
    );
    let out = Command::new(bin()).args(["man", "nope"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn listen_failures_exit_2_for_config_and_1_for_a_port_in_use() {
    let dir = TempDir::new("listen");
    let socket = dir.path().join("l.sock");
    let group = unique_group();
    let run = |listen: &str| {
        let mut args = loopback_args("l", &group, &socket);
        let at = args.iter().position(|a| a == "127.0.0.1:0").unwrap();
        args[at] = listen.into();
        Command::new(bin())
            .args(args)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let out = run(&taken.local_addr().unwrap().to_string());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "a runtime condition: {err}");
    assert!(err.contains("in use"), "{err}");
    assert!(!socket.exists());
    // TEST-NET-1: never an address of this host; nothing is sent. (Where
    // the host allows binding foreign addresses the bind would succeed.)
    let nonlocal = std::fs::read_to_string("/proc/sys/net/ipv4/ip_nonlocal_bind")
        .is_ok_and(|v| v.trim() != "0");
    if nonlocal {
        eprintln!("skipped the non-local half: net.ipv4.ip_nonlocal_bind is set");
        return;
    }
    let out = run("192.0.2.1:0");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "cannot work here: {err}");
    assert!(err.contains("not an address of this host"), "{err}");
    assert!(!socket.exists());
}

#[test]
fn a_socket_mode_open_to_other_users_is_accepted_with_a_warning() {
    let dir = TempDir::new("mode");
    let group = unique_group();
    let open = spawn(dir.path(), "open", &group, &["--socket-mode", "0777"], &[]);
    let mode = std::fs::metadata(&open.socket)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o777);
    let log = open.log_text();
    assert!(
        log.contains("WARN") && log.contains("--socket-mode lets every local user"),
        "{log}"
    );
    let group_only = spawn(dir.path(), "grp", &group, &["--socket-mode", "0660"], &[]);
    wait_until(LIMIT, "started", || {
        group_only.log_text().contains("node started")
    });
    assert!(!group_only.log_text().contains("--socket-mode lets"));
}

#[test]
fn cluster_script_usage_is_only_the_usage() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/cluster");
    let out = Command::new("bash")
        .arg(&script)
        .arg("-h")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(text.starts_with("Runs a constellationd cluster"), "{text}");
    assert!(
        text.trim_end().ends_with("alive linked peers"),
        "ends with the last command: {text}"
    );
    assert!(
        !text.contains("set -euo") && !text.contains("cd \""),
        "{text}"
    );
}

/// One network namespace with only `lo`, deleted on drop.
struct Netns(String);

impl Netns {
    fn new() -> Option<Netns> {
        if std::env::var_os("CONSTELLATION_SKIP_NETNS").is_some_and(|v| v == "1") {
            eprintln!("netns test skipped: CONSTELLATION_SKIP_NETNS=1");
            return None;
        }
        let name = format!("cstops{}", std::process::id() % 100_000);
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            ok,
            "ip netns add (needs root; set CONSTELLATION_SKIP_NETNS=1 to skip)"
        );
        let ns = Netns(name);
        ns.ip(&["link", "set", "lo", "up"]);
        Some(ns)
    }

    fn ip(&self, args: &[&str]) {
        let ok = Command::new("ip")
            .args(["-n", &self.0])
            .args(args)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "ip -n {} {}", self.0, args.join(" "));
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Best effort: a leftover namespace holds nothing of value.
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Own beacons that stop looping back and beacons that cannot be sent are
/// logged as a WARN (not only shown in status): the node runs in a
/// namespace of its own, whose multicast is then dropped by iptables, and
/// whose `lo` then goes down.
#[test]
fn beacon_trouble_is_warned_about_in_the_log() {
    let Some(ns) = Netns::new() else { return };
    let dir = TempDir::new("beaconwarn");
    let socket: PathBuf = dir.path().join("n.sock");
    let log = dir.path().join("n.log");
    // `ip netns exec` execs the daemon: the child's PID is the daemon's.
    let child = Command::new("ip")
        .args(["netns", "exec", &ns.0, bin()])
        .args(loopback_args("n", &unique_group(), &socket))
        .args(["--beacon-interval", "200ms"])
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let d = Daemon {
        child,
        name: "n".into(),
        socket,
        log,
    };
    wait_until(LIMIT, "control socket", || d.socket.exists());
    wait_until(LIMIT, "own beacons loop back", || {
        self_info(&d.socket)["multicast_loops_back"] == true
    });
    assert!(
        !d.log_text().contains("beacons fail to send"),
        "healthy so far"
    );
    // Multicast blocked on the way in: own beacons stop looping back.
    if Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns.0,
            "iptables",
            "-A",
            "INPUT",
            "-d",
            "239.0.0.0/8",
            "-j",
            "DROP",
        ])
        .status()
        .is_ok_and(|s| s.success())
    {
        wait_until(LIMIT, "loopback loss warned", || {
            d.log_text()
                .contains("own multicast beacons stopped looping back")
        });
    } else {
        eprintln!("iptables unavailable: the loopback half of this test is skipped");
    }
    ns.ip(&["link", "set", "lo", "down"]);
    wait_until(LIMIT, "send failures warned", || {
        d.log_text().contains("beacons fail to send")
    });
    let log = d.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("beacons fail to send"))
        .unwrap();
    assert!(
        line.contains("WARN") && line.contains("interfaces=lo"),
        "{line}"
    );
    drop(d);
}
