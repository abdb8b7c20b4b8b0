//! The systemd notification protocol (`Type=notify`), through `sd-notify`.
//!
//! Every function is a no-op unless systemd (or a test) set
//! `NOTIFY_SOCKET`. The daemon sends:
//! - `READY=1` (with a `STATUS=` line) once the TCP listener, the multicast
//!   sockets and the control socket are bound and the tasks run;
//! - `RELOADING=1` (with `MONOTONIC_USEC=`) when a SIGHUP reload starts,
//!   and `READY=1` again when it is done;
//! - `STOPPING=1` as soon as a graceful stop (leave) begins;
//! - `WATCHDOG=1` every half `WATCHDOG_USEC`, when systemd set it
//!   (`WatchdogSec=`), from a task of the node's own runtime: if the event
//!   loop stalls, the pings stop and systemd restarts the node.
//!
//! A failed notification is logged (the watchdog's once) and changes
//! nothing else: the node runs the same with or without systemd.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

fn send(what: &str, states: &[NotifyState<'_>]) {
    if let Err(error) = sd_notify::notify(states) {
        warn!(%error, what, "cannot notify the service manager (NOTIFY_SOCKET)");
    }
}

/// `READY=1`: the node serves.
pub fn ready(status: &str) {
    send("ready", &[NotifyState::Ready, NotifyState::Status(status)]);
}

/// `RELOADING=1`: a reload starts.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send("reloading", &[NotifyState::Reloading, now]),
        Err(_) => send("reloading", &[NotifyState::Reloading]),
    }
}

/// `STOPPING=1`: the node is leaving.
pub fn stopping() {
    send(
        "stopping",
        &[NotifyState::Stopping, NotifyState::Status("leaving")],
    );
}

/// How often to ping the watchdog: half of `WATCHDOG_USEC`, if set for
/// this process.
pub fn watchdog_every() -> Option<Duration> {
    sd_notify::watchdog_enabled()
        .filter(|d| !d.is_zero())
        .map(|d| d / 2)
}

/// Sends `WATCHDOG=1` every `every` until `cancel` fires.
pub async fn watchdog(every: Duration, cancel: CancellationToken) {
    static WARNED: AtomicBool = AtomicBool::new(false);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            () = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(error) = sd_notify::notify(&[NotifyState::Watchdog]) {
            if WARNED.swap(true, Ordering::Relaxed) {
                debug!(%error, "watchdog notification failed");
            } else {
                warn!(%error, "watchdog notification failed (logged once)");
            }
        }
    }
}
