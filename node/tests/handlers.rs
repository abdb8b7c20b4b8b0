//! Event handlers (`--handler`) with the real binary: programs that
//! succeed, fail, hang, vanish or flood their output, a flood of events
//! against a slow handler, refusals at start, and a SIGHUP reload.
//!
//! Nodes run on loopback (interface lo, TTL 0, port 0). Handlers are small
//! shell scripts in a temporary directory, and the binary's own
//! `handler-log` subcommand.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use support::{
    bin, curl, http, loopback_args, self_info, unique_group, wait_until, Daemon, TempDir,
};

/// Generous: the test machine is busy.
const LIMIT: Duration = Duration::from_secs(40);

/// Writes an executable `#!/bin/sh` script.
fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

/// `status`'s handler counters (zeros when absent).
fn counters(socket: &Path) -> Value {
    let v = self_info(socket)["handlers"].clone();
    if v.is_null() {
        serde_json::json!({})
    } else {
        v
    }
}

fn n(v: &Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or(0)
}

/// The files `dir` holds that end in `.done`, read.
fn done_files(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.path().extension().is_some_and(|x| x == "done") {
            out.push(std::fs::read_to_string(e.path()).unwrap_or_default());
        }
    }
    out
}

#[test]
fn a_handler_gets_the_event_on_stdin_and_its_environment() {
    let dir = TempDir::new("h-ok");
    let group = unique_group();
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let ok = script(
        dir.path(),
        "ok.sh",
        &format!(
            "f={}/$$\n{{ cat; echo; env | grep '^CONSTELLATION_' | sort; }} > \"$f.tmp\" && mv \"$f.tmp\" \"$f.done\"",
            out.display()
        ),
    );
    let log = dir.path().join("events.log");
    let a = Daemon::start(
        dir.path(),
        "a",
        &group,
        &[
            "--handler",
            &format!("peer_joined={}", ok.display()),
            "--handler",
            &format!(
                "peer_joined,link_up={} handler-log {}",
                bin(),
                log.display()
            ),
        ],
    );
    let b = Daemon::start(dir.path(), "b", &group, &[]);
    let a_id = self_info(&a.socket)["id"].as_str().unwrap().to_string();
    let b_id = self_info(&b.socket)["id"].as_str().unwrap().to_string();

    let mut seen = String::new();
    wait_until(LIMIT, "the script ran for b's join", || {
        match done_files(&out)
            .into_iter()
            .find(|t| t.contains("CONSTELLATION_PEER_NAME=b\n"))
        {
            Some(t) => {
                seen = t;
                true
            }
            None => false,
        }
    });
    let (event, env) = seen.split_once('\n').unwrap();
    let event: Value = serde_json::from_str(event).expect("stdin is the event's JSON");
    assert_eq!(event["type"], "peer_joined");
    assert_eq!(event["peer"]["name"], "b");
    assert_eq!(event["peer"]["id"], b_id.as_str());
    assert!(event["at"].as_str().is_some_and(|s| s.ends_with('Z')));
    for want in [
        "CONSTELLATION_EVENT=peer_joined".to_string(),
        "CONSTELLATION_NODE_NAME=a".into(),
        format!("CONSTELLATION_NODE_ID={a_id}"),
        format!("CONSTELLATION_PEER_ID={b_id}"),
        "CONSTELLATION_PEER_STATE=alive".into(),
        "CONSTELLATION_CLUSTER=default".into(),
        format!("CONSTELLATION_SOCKET={}", a.socket.display()),
    ] {
        assert!(env.lines().any(|l| l == want), "{want} not in\n{env}");
    }
    assert!(
        env.contains("CONSTELLATION_EVENT_AT=")
            && env.contains("CONSTELLATION_PEER_ADDR=127.0.0.1:")
    );

    // The binary as its own handler: one JSON line per event.
    wait_until(LIMIT, "handler-log wrote join and link_up", || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let kinds: Vec<String> = text
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .map(|v| v["type"].as_str().unwrap_or("").to_string())
            .collect();
        kinds.iter().any(|k| k == "peer_joined") && kinds.iter().any(|k| k == "link_up")
    });
    wait_until(LIMIT, "every run counted", || {
        let c = counters(&a.socket);
        n(&c, "succeeded") >= 3 && n(&c, "running") == 0 && n(&c, "queued") == 0
    });
    let c = counters(&a.socket);
    assert_eq!(n(&c, "configured"), 2, "{c}");
    assert_eq!(n(&c, "started"), n(&c, "succeeded"), "{c}");
    assert_eq!(
        n(&c, "failed") + n(&c, "timed_out") + n(&c, "dropped"),
        0,
        "{c}"
    );
    assert!(
        counters(&b.socket).as_object().unwrap().is_empty(),
        "no handlers: nothing in status"
    );
    let (code, metrics) = curl(&a.socket, &["http://localhost/metrics"]);
    assert_eq!(code, 200);
    assert!(metrics.contains("constellation_handlers 2"), "{metrics}");
    assert!(
        metrics.contains(&format!(
            "constellation_handler_runs_total{{outcome=\"succeeded\"}} {}",
            n(&c, "succeeded")
        )),
        "{metrics}"
    );
    let status = a.cli(&["status"]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(text.contains("handlers:    2 configured"), "{text}");
}

#[test]
fn failing_hanging_vanishing_and_noisy_handlers_are_counted_and_survived() {
    let dir = TempDir::new("h-bad");
    let group = unique_group();
    let fail = script(
        dir.path(),
        "fail.sh",
        "echo \"boom on $CONSTELLATION_EVENT\" >&2\nexit 3",
    );
    let pid_file = dir.path().join("hang.pid");
    let hang = script(
        dir.path(),
        "hang.sh",
        &format!("echo $$ > {}\nexec sleep 60", pid_file.display()),
    );
    let gone = script(dir.path(), "gone.sh", "exit 0");
    // Ten megabytes on each pipe, and it reads no input.
    let noisy = script(
        dir.path(),
        "noisy.sh",
        "head -c 10000000 /dev/zero\nhead -c 10000000 /dev/zero >&2\nexit 0",
    );
    let on_join = |p: &Path| format!("peer_joined={}", p.display());
    let a = Daemon::start(
        dir.path(),
        "a",
        &group,
        &[
            "--handler",
            &on_join(&fail),
            "--handler",
            &on_join(&hang),
            "--handler",
            &on_join(&gone),
            "--handler",
            &on_join(&noisy),
            "--handler-timeout",
            "1s",
        ],
    );
    // Present at start, gone by the first event.
    std::fs::remove_file(&gone).unwrap();
    let _b = Daemon::start(dir.path(), "b", &group, &[]);
    wait_until(LIMIT, "four outcomes counted", || {
        let c = counters(&a.socket);
        n(&c, "failed") >= 2
            && n(&c, "timed_out") >= 1
            && n(&c, "succeeded") >= 1
            && n(&c, "running") == 0
    });
    let c = counters(&a.socket);
    assert_eq!(n(&c, "started"), 4, "one join, four handlers: {c}");
    assert_eq!(
        (n(&c, "failed"), n(&c, "timed_out"), n(&c, "succeeded")),
        (2, 1, 1),
        "{c}"
    );
    let pid = std::fs::read_to_string(&pid_file).unwrap();
    let proc_dir = PathBuf::from(format!("/proc/{}", pid.trim()));
    assert!(!proc_dir.exists(), "the hung handler was killed and reaped");
    let log = a.log_text();
    assert!(log.contains("handler failed"), "{log}");
    assert!(
        log.contains("boom on peer_joined"),
        "stderr is logged: {log}"
    );
    assert!(log.contains("exit status: 3"), "{log}");
    assert!(log.contains("handler timed out and was killed"), "{log}");
    assert!(log.contains("handler could not start"), "{log}");
    // The node is fine.
    assert_eq!(self_info(&a.socket)["name"], "a");
    assert_eq!(a.state_of("b").as_deref(), Some("alive"));
}

#[test]
fn a_flood_of_events_against_a_slow_handler_is_bounded_and_never_blocks() {
    const MESSAGES: u64 = 1000;
    const BACKLOG: u64 = 50;
    const CONCURRENCY: u64 = 4;
    let dir = TempDir::new("h-flood");
    let group = unique_group();
    let slow = script(dir.path(), "slow.sh", "sleep 0.1");
    let a = Daemon::start(
        dir.path(),
        "a",
        &group,
        &[
            "--handler",
            &format!("message:flood={}", slow.display()),
            "--handler-concurrency",
            &CONCURRENCY.to_string(),
            "--handler-backlog",
            &BACKLOG.to_string(),
        ],
    );
    let b = Daemon::start(dir.path(), "b", &group, &[]);
    wait_until(LIMIT, "a and b linked", || {
        a.linked() == 1 && b.linked() == 1
    });
    let body = br#"{"to": "a", "topic": "flood", "payload": "x"}"#;
    let other = br#"{"to": "a", "topic": "other", "payload": "x"}"#;
    for i in 0..MESSAGES {
        let (code, resp) = http(&b.socket, "POST", "/v1/messages", body);
        assert_eq!(code, 200, "send {i}: {resp}");
        if i % 100 == 0 {
            // Another topic: not for this handler.
            assert_eq!(http(&b.socket, "POST", "/v1/messages", other).0, 200);
            // The node answers while its handlers are busy, within bounds.
            let info = self_info(&a.socket);
            assert_eq!(info["name"], "a", "status answers during the flood");
            let c = &info["handlers"];
            assert!(n(c, "queued") <= BACKLOG, "{c}");
            assert!(n(c, "running") <= CONCURRENCY, "{c}");
        }
    }
    wait_until(
        Duration::from_secs(90),
        "every flood event accounted for",
        || {
            let c = counters(&a.socket);
            n(&c, "started") + n(&c, "dropped") == MESSAGES
                && n(&c, "running") == 0
                && n(&c, "queued") == 0
        },
    );
    let c = counters(&a.socket);
    assert!(n(&c, "dropped") > 0, "the backlog overflowed: {c}");
    assert!(n(&c, "started") >= BACKLOG, "{c}");
    assert_eq!(n(&c, "succeeded"), n(&c, "started"), "{c}");
    assert_eq!(
        self_info(&a.socket)["counters"]["messages_in"].as_u64(),
        Some(MESSAGES + MESSAGES / 100)
    );
    assert!(a.log_text().contains("handler backlog full; run dropped"));
}

/// `run` with `extra`, expected to refuse before binding: its stderr.
fn refused(dir: &Path, extra: &[&str]) -> String {
    let socket = dir.join("never.sock");
    let out = Command::new(bin())
        .args(loopback_args("x", &unique_group(), &socket))
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(2), "{extra:?}: {err}");
    assert!(!socket.exists(), "nothing bound");
    err
}

#[test]
fn bad_handlers_are_usage_errors_at_start() {
    let dir = TempDir::new("h-refuse");
    let plain = dir.path().join("plain.sh");
    std::fs::write(&plain, "#!/bin/sh\n").unwrap();
    let plain = plain.display().to_string();
    let missing = dir.path().join("missing").display().to_string();
    let err = refused(dir.path(), &["--handler", "peer_joind=/bin/sh"]);
    assert!(err.contains("unknown event type \"peer_joind\""), "{err}");
    let err = refused(dir.path(), &["--handler", &missing]);
    assert!(err.contains("No such file"), "{err}");
    let err = refused(dir.path(), &["--handler", &format!("peer_failed={plain}")]);
    assert!(err.contains("not executable"), "{err}");
    let err = refused(dir.path(), &["--handler-concurrency", "0"]);
    assert!(err.contains("--handler-concurrency"), "{err}");
    // The config file's key goes through the same checks.
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, "handler = [\"message:=/bin/sh\"]\n").unwrap();
    let err = refused(dir.path(), &["--config", cfg.to_str().unwrap()]);
    assert!(
        err.contains("key `handler`") && err.contains("needs a topic"),
        "{err}"
    );
}

#[test]
fn sighup_installs_handlers_from_the_config_file() {
    let dir = TempDir::new("h-hup");
    let group = unique_group();
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, "handler-timeout = \"5s\"\n").unwrap();
    let a = Daemon::start(
        dir.path(),
        "a",
        &group,
        &["--config", cfg.to_str().unwrap()],
    );
    assert!(self_info(&a.socket)["handlers"].is_null(), "none yet");
    let log = dir.path().join("events.log");
    std::fs::write(
        &cfg,
        format!(
            "handler-timeout = \"5s\"\nhandler = [\"peer_joined={} handler-log {}\"]\n",
            bin(),
            log.display()
        ),
    )
    .unwrap();
    a.signal("-HUP");
    wait_until(LIMIT, "the handler is configured", || {
        n(&counters(&a.socket), "configured") == 1
    });
    assert!(
        a.log_text().contains("applied=handler="),
        "{}",
        a.log_text()
    );
    let _b = Daemon::start(dir.path(), "b", &group, &[]);
    wait_until(LIMIT, "the new handler ran", || {
        std::fs::read_to_string(&log).is_ok_and(|t| t.contains("\"peer_joined\""))
    });
    // And removing it stops it.
    std::fs::write(&cfg, "handler-timeout = \"5s\"\n").unwrap();
    a.signal("-HUP");
    wait_until(LIMIT, "the handler is gone", || {
        n(&counters(&a.socket), "configured") == 0
    });
}
