//! Operations subcommands: `log-level`, `monitor` (clients of the routes in
//! [`crate::ops`]), and `completions`, `man` (generated from the same clap
//! definitions as the parser, so they never drift from it).
//!
//! Exit codes as for every CLI subcommand: 0 success, 1 the daemon answered
//! with an error, 2 usage, 3 no daemon at the socket.

use std::io::Write;
use std::process::ExitCode;

use clap::{CommandFactory, Subcommand};
use http_body_util::BodyExt;
use hyper::Method;
use serde_json::{json, Value};

use crate::cli::{escape, json_safe, EXIT_API, EXIT_NO_DAEMON, EXIT_USAGE};
use crate::client::{Client, ClientError};
use crate::config::{Cli, SocketArg};
use crate::logging::{LogFormat, LogLevel};
use crate::socket;

/// The operations subcommands (flattened into [`crate::config::Command`]).
#[derive(Debug, Subcommand)]
pub enum OpsCommand {
    /// Show the node's log level, or change it now.
    ///
    /// A change lasts until the node restarts (or a reload whose file
    /// changes the level); RUST_LOG's per-module filters stay.
    #[command(
        after_help = "Examples:\n  constellationd log-level\n  constellationd log-level debug\n  constellationd log-level --format json"
    )]
    LogLevel {
        /// Control socket.
        #[command(flatten)]
        sock: SocketArg,
        /// The new level.
        #[arg(value_enum)]
        level: Option<LogLevel>,
        /// The new format of the node's standard error.
        #[arg(long, value_enum)]
        format: Option<LogFormat>,
        /// Print the API's JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stream the node's log lines until interrupted.
    ///
    /// The level is the monitor's own: `--level debug` shows debug lines
    /// even when the node logs at info.
    #[command(after_help = "Example:\n  constellationd monitor --level debug")]
    Monitor {
        /// Control socket.
        #[command(flatten)]
        sock: SocketArg,
        /// The most verbose level to show.
        #[arg(long, value_enum, default_value = "info")]
        level: LogLevel,
        /// Print each line's JSON as received.
        #[arg(long)]
        json: bool,
    },
    /// Print a shell completion script.
    #[command(
        after_help = "Examples:\n  constellationd completions bash > /usr/share/bash-completion/completions/constellationd\n  constellationd completions zsh > \"${fpath[1]}/_constellationd\"\n  constellationd completions fish > ~/.config/fish/completions/constellationd.fish"
    )]
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Append standard input to FILE as one line: an event handler for
    /// images without a shell (`--handler 'peer_joined=/constellationd
    /// handler-log /data/events.log'`).
    #[command(hide = true)]
    HandlerLog {
        /// Start the line with this process's start time (RFC 3339) and a space.
        #[arg(long)]
        stamp: bool,
        /// The file (created if missing).
        file: std::path::PathBuf,
    },
    /// Print the man page (roff) of constellationd, or of one subcommand.
    #[command(
        after_help = "Examples:\n  constellationd man | man -l -\n  constellationd man run > /usr/share/man/man1/constellationd-run.1"
    )]
    Man {
        /// A subcommand (`run`, `peers`, ...).
        subcommand: Option<String>,
    },
}

fn client(sock: &SocketArg) -> Client {
    Client::new(&socket::resolve(sock.socket.as_deref()))
}

fn fail(e: ClientError) -> ExitCode {
    eprintln!("constellationd: {}", escape(&e.to_string()));
    match e {
        ClientError::NoDaemon { .. } => ExitCode::from(EXIT_NO_DAEMON),
        ClientError::Http { .. } => ExitCode::from(EXIT_API),
    }
}

fn api_error(status: hyper::StatusCode, v: &Value) -> ExitCode {
    let msg = v["error"].as_str().unwrap_or("request failed");
    eprintln!("constellationd: {} ({status})", escape(msg));
    ExitCode::from(EXIT_API)
}

/// Runs an operations subcommand.
pub async fn run(cmd: OpsCommand) -> ExitCode {
    match cmd {
        OpsCommand::LogLevel {
            sock,
            level,
            format,
            json,
        } => log_level(&sock, level, format, json).await,
        OpsCommand::Monitor { sock, level, json } => monitor(&client(&sock), level, json).await,
        OpsCommand::Completions { shell } => {
            let mut out = std::io::stdout().lock();
            clap_complete::generate(shell, &mut Cli::command(), "constellationd", &mut out);
            ExitCode::SUCCESS
        }
        OpsCommand::Man { subcommand } => man(subcommand.as_deref()),
        OpsCommand::HandlerLog { stamp, file } => {
            match crate::handlers::handler_log(&file, stamp) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("constellationd: handler-log {}: {e}", file.display());
                    ExitCode::from(EXIT_API)
                }
            }
        }
    }
}

/// The daemon's log settings for people.
pub fn render_level(v: &Value) -> String {
    let s = |k: &str| escape(v[k].as_str().unwrap_or("?")).into_owned();
    format!(
        "level:    {}\nfilter:   {}\nformat:   {}\nmonitors: {} ({} lines dropped)\n",
        s("level"),
        s("filter"),
        s("format"),
        v["monitors"].as_u64().unwrap_or(0),
        v["monitor_lines_dropped"].as_u64().unwrap_or(0),
    )
}

async fn log_level(
    sock: &SocketArg,
    level: Option<LogLevel>,
    format: Option<LogFormat>,
    json: bool,
) -> ExitCode {
    let c = client(sock);
    let res = if level.is_none() && format.is_none() {
        c.send::<Value>(Method::GET, "/v1/log-level", None).await
    } else {
        let mut body = serde_json::Map::new();
        if let Some(l) = level {
            body.insert("level".into(), l.as_str().into());
        }
        if let Some(f) = format {
            body.insert("format".into(), f.as_str().into());
        }
        c.send(Method::PUT, "/v1/log-level", Some(&Value::Object(body)))
            .await
    };
    let res = res.and_then(|a| Ok((a.status, a.json()?)));
    match res {
        Err(e) => fail(e),
        Ok((st, v)) if !st.is_success() => api_error(st, &v),
        Ok((_, v)) if json => {
            let text = serde_json::to_string_pretty(&v).unwrap_or_default();
            println!("{}", json_safe(&text));
            ExitCode::SUCCESS
        }
        Ok((_, v)) => {
            print!("{}", render_level(&v));
            ExitCode::SUCCESS
        }
    }
}

/// One monitor line for people: `TIME LEVEL message key=value ...`.
pub fn render_log_line(v: &Value) -> String {
    match v["type"].as_str() {
        Some("dropped") => {
            return format!(
                "... {} log lines dropped (reader too slow)",
                v["count"].as_u64().unwrap_or(0)
            )
        }
        Some("subscribed") => {
            return format!(
                "monitoring log lines at level {} and below (Ctrl-C to stop)",
                escape(v["level"].as_str().unwrap_or("?"))
            )
        }
        _ => {}
    }
    let ts = v["timestamp"].as_str().unwrap_or("");
    let time = ts.get(11..23).unwrap_or(ts);
    let mut out = format!(
        "{}  {:<5} ",
        escape(time),
        escape(v["level"].as_str().unwrap_or("?"))
    );
    if let Some(fields) = v["fields"].as_object() {
        if let Some(m) = fields.get("message") {
            out.push_str(&shown(m));
        }
        for (k, val) in fields.iter().filter(|(k, _)| *k != "message") {
            out.push_str(&format!(" {}={}", escape(k), shown(val)));
        }
    }
    out
}

fn shown(v: &Value) -> String {
    match v {
        Value::String(s) => escape(s).into_owned(),
        other => escape(&other.to_string()).into_owned(),
    }
}

async fn monitor(client: &Client, level: LogLevel, json: bool) -> ExitCode {
    let uri = format!("/v1/monitor?level={}", level.as_str());
    let resp = match client.request(Method::GET, &uri, bytes::Bytes::new()).await {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    if !resp.status().is_success() {
        let status = resp.status();
        let body = resp.into_body().collect().await.map(|b| b.to_bytes());
        let v: Value = body
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_else(|| json!({}));
        return api_error(status, &v);
    }
    follow_lines(resp, "log", |text| {
        match serde_json::from_str::<Value>(text) {
            Ok(_) if json => json_safe(text).into_owned(),
            Ok(v) => render_log_line(&v),
            Err(_) => escape(text).into_owned(),
        }
    })
    .await
}

/// Follows an NDJSON stream (`/v1/events`, `/v1/monitor`) until Ctrl-C or
/// its end, printing what `render` makes of each line (given without its
/// newline, invalid UTF-8 replaced) on standard output. `what` names the
/// stream in messages. Exit status: 0 after Ctrl-C, the daemon closing the
/// stream or standard output closing (piped into `head`); 1 when the
/// stream broke.
pub async fn follow_lines(
    resp: hyper::Response<hyper::body::Incoming>,
    what: &str,
    mut render: impl FnMut(&str) -> String,
) -> ExitCode {
    let mut body = resp.into_body();
    let mut pending = Vec::new();
    let stdout = std::io::stdout();
    loop {
        let frame = tokio::select! {
            f = body.frame() => f,
            _ = tokio::signal::ctrl_c() => return ExitCode::SUCCESS,
        };
        let Some(frame) = frame else {
            eprintln!("constellationd: the daemon closed the {what} stream");
            return ExitCode::SUCCESS;
        };
        let Ok(frame) = frame else {
            eprintln!("constellationd: the {what} stream broke");
            return ExitCode::from(EXIT_API);
        };
        let Ok(data) = frame.into_data() else {
            continue; // trailers: nothing to print
        };
        pending.extend_from_slice(&data);
        while let Some(pos) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=pos).collect();
            let text = String::from_utf8_lossy(&line[..line.len() - 1]);
            let shown = render(&text);
            let mut out = stdout.lock();
            if writeln!(out, "{shown}").and_then(|()| out.flush()).is_err() {
                return ExitCode::SUCCESS; // stdout closed (piped into head)
            }
        }
    }
}

fn man(subcommand: Option<&str>) -> ExitCode {
    let cmd = Cli::command();
    let page = match subcommand {
        None => cmd,
        Some(name) => match cmd.find_subcommand(name) {
            Some(sub) => sub.clone().name(format!("constellationd-{name}")),
            None => {
                eprintln!(
                    "constellationd: no subcommand {:?}; see constellationd --help",
                    escape(name)
                );
                return ExitCode::from(EXIT_USAGE);
            }
        },
    };
    let mut out = std::io::stdout().lock();
    match clap_mangen::Man::new(page).render(&mut out) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("constellationd: cannot write the man page: {e}");
            ExitCode::from(EXIT_API)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_lines_render_on_one_escaped_line() {
        let v = json!({"timestamp": "2024-05-01T10:11:12.345678Z", "level": "WARN",
            "fields": {"message": "evil\x1b[2J\nline", "peer": "n\n2", "n": 3}, "target": "node"});
        let line = render_log_line(&v);
        assert_eq!(
            line,
            "10:11:12.345  WARN  evil\\x1b[2J\\nline n=3 peer=n\\n2"
        );
        assert!(render_log_line(&json!({"type": "dropped", "count": 7}))
            .contains("7 log lines dropped"));
    }

    #[test]
    fn every_subcommand_has_a_man_page() {
        for sub in Cli::command().get_subcommands() {
            let mut out = Vec::new();
            let page = sub
                .clone()
                .name(format!("constellationd-{}", sub.get_name()));
            clap_mangen::Man::new(page).render(&mut out).unwrap();
            assert!(
                String::from_utf8_lossy(&out).contains(".TH"),
                "{}",
                sub.get_name()
            );
        }
    }
}
