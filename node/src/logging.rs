//! The daemon's logs: level and format from the configuration, changeable
//! while the node runs, and a monitor hub that streams log lines to control
//! API clients (`constellationd monitor`).
//!
//! One `tracing` subscriber with two layers, each with its own filter:
//! - standard error, text or JSON ([`LogFormat`], switchable at runtime),
//!   filtered by a reloadable `EnvFilter`: the default level
//!   (`--log-level`, or a bare level in `RUST_LOG`, which wins at start)
//!   plus the per-module directives of `RUST_LOG`, kept across level
//!   changes;
//! - the monitor hub, JSON lines, filtered by the most verbose level any
//!   monitor asked for (off when nobody monitors, so it costs one atomic
//!   load per log call that passes the level check, and nothing for the
//!   rest). Each monitor has its own backlog, bounded in lines and bytes
//!   ([`MONITOR_BACKLOG_LINES`], [`MONITOR_BACKLOG_BYTES`]); a line that
//!   does not fit is counted, and the monitor reads how many it missed in
//!   its place. Publishing never waits for a reader.

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use tokio::sync::Notify;
use tracing::level_filters::LevelFilter;
use tracing::{Level, Metadata, Subscriber};
use tracing_subscriber::fmt::format::{Format, Full, Json, Writer};
use tracing_subscriber::fmt::time::SystemTime;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, MakeWriter};
use tracing_subscriber::layer::{Context, Filter, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Layer, Registry};

/// Lines buffered per monitor before further lines are dropped for it.
pub const MONITOR_BACKLOG_LINES: usize = 1024;
/// Bytes buffered per monitor (a line larger than this still passes an
/// empty backlog).
pub const MONITOR_BACKLOG_BYTES: usize = 1 << 20;

/// A log level, as flags, the config file and the API spell it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, clap::ValueEnum)]
pub enum LogLevel {
    /// Errors only.
    Error,
    /// Warnings and errors.
    Warn,
    /// What the node does (the default).
    Info,
    /// Details for debugging.
    Debug,
    /// Everything.
    Trace,
}

impl LogLevel {
    /// The lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }

    /// The `tracing` level.
    pub fn level(self) -> Level {
        match self {
            LogLevel::Error => Level::ERROR,
            LogLevel::Warn => Level::WARN,
            LogLevel::Info => Level::INFO,
            LogLevel::Debug => Level::DEBUG,
            LogLevel::Trace => Level::TRACE,
        }
    }
}

impl std::str::FromStr for LogLevel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        <LogLevel as clap::ValueEnum>::from_str(s, true)
            .map_err(|_| format!("unknown level {s:?} (error, warn, info, debug, trace)"))
    }
}

impl fmt::Display for LogLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How log lines on standard error look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event.
    Text,
    /// One JSON object per line (`timestamp`, `level`, `fields`, `target`).
    Json,
}

impl LogFormat {
    /// The lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

/// Index of a level filter in 0 (off) ..= 5 (trace), for atomics.
fn filter_index(f: LevelFilter) -> u8 {
    match f.into_level() {
        None => 0,
        Some(Level::ERROR) => 1,
        Some(Level::WARN) => 2,
        Some(Level::INFO) => 3,
        Some(Level::DEBUG) => 4,
        Some(Level::TRACE) => 5,
    }
}

fn index_filter(i: u8) -> LevelFilter {
    match i {
        0 => LevelFilter::OFF,
        1 => LevelFilter::ERROR,
        2 => LevelFilter::WARN,
        3 => LevelFilter::INFO,
        4 => LevelFilter::DEBUG,
        _ => LevelFilter::TRACE,
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section here is a push, a pop, a retain or an
    // assignment: the data is consistent even after a panic.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// `RUST_LOG` split into its bare level (if any) and its per-module
/// directives.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RustLog {
    /// A bare level (`RUST_LOG=debug` or `debug,hyper=warn`).
    pub level: Option<LevelFilter>,
    /// Every other directive (`transport=trace`, `node::api`).
    pub targets: Vec<String>,
}

impl RustLog {
    /// Splits `s`; `Err` names the first directive `EnvFilter` refuses.
    pub fn parse(s: &str) -> Result<RustLog, String> {
        let mut out = RustLog::default();
        for d in s.split(',').map(str::trim).filter(|d| !d.is_empty()) {
            match d.parse::<LevelFilter>() {
                Ok(l) if !d.contains('=') => out.level = Some(l),
                _ => {
                    EnvFilter::builder()
                        .parse(d)
                        .map_err(|e| format!("RUST_LOG directive {d:?}: {e}"))?;
                    out.targets.push(d.to_string());
                }
            }
        }
        Ok(out)
    }

    /// The filter string for default level `level` plus these directives.
    pub fn directives(&self, level: LevelFilter) -> String {
        let mut s = level.to_string().to_lowercase();
        for t in &self.targets {
            s.push(',');
            s.push_str(t);
        }
        s
    }
}

/// Why the log level could not be changed.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The subscriber this control belonged to is gone (never installed).
    #[error("log control is not installed in this process")]
    Detached,
    /// `EnvFilter` refused the directives (cannot happen for levels).
    #[error("bad filter {0:?}: {1}")]
    Filter(String, String),
}

/// The handle to the running log configuration: cheap to clone.
#[derive(Clone)]
pub struct LogControl {
    inner: Arc<Inner>,
}

struct Inner {
    filter: reload::Handle<EnvFilter, Registry>,
    /// `FORMAT_TEXT` or `FORMAT_JSON`, shared with the formatter.
    format: Arc<AtomicU8>,
    /// The default level and the `RUST_LOG` directives kept with it.
    state: Mutex<(LevelFilter, RustLog)>,
    hub: Arc<MonitorHub>,
}

impl fmt::Debug for LogControl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogControl")
            .field("filter", &self.filter())
            .field("format", &self.format())
            .finish_non_exhaustive()
    }
}

const FORMAT_TEXT: u8 = 0;
const FORMAT_JSON: u8 = 1;

impl LogControl {
    /// The default level now (`off` only when `RUST_LOG=off` set it).
    pub fn level(&self) -> LevelFilter {
        lock(&self.inner.state).0
    }

    /// The whole filter now, as `EnvFilter` directives.
    pub fn filter(&self) -> String {
        let st = lock(&self.inner.state);
        st.1.directives(st.0)
    }

    /// Sets the default level; `RUST_LOG`'s per-module directives stay.
    pub fn set_level(&self, level: LogLevel) -> Result<(), LogError> {
        let mut st = lock(&self.inner.state);
        let lf = LevelFilter::from_level(level.level());
        let directives = st.1.directives(lf);
        let filter = EnvFilter::builder()
            .parse(&directives)
            .map_err(|e| LogError::Filter(directives.clone(), e.to_string()))?;
        self.inner
            .filter
            .reload(filter)
            .map_err(|_| LogError::Detached)?;
        st.0 = lf;
        Ok(())
    }

    /// The format of standard error now.
    pub fn format(&self) -> LogFormat {
        match self.inner.format.load(Ordering::Relaxed) {
            FORMAT_JSON => LogFormat::Json,
            _ => LogFormat::Text,
        }
    }

    /// Switches the format of standard error (from the next line on).
    pub fn set_format(&self, format: LogFormat) {
        let v = match format {
            LogFormat::Text => FORMAT_TEXT,
            LogFormat::Json => FORMAT_JSON,
        };
        self.inner.format.store(v, Ordering::Relaxed);
    }

    /// The monitor hub.
    pub fn hub(&self) -> &Arc<MonitorHub> {
        &self.inner.hub
    }
}

/// Text or JSON, chosen per event from the shared switch.
struct Switch {
    format: Arc<AtomicU8>,
    text: Format<Full, SystemTime>,
    json: Format<Json, SystemTime>,
}

impl<S, N> FormatEvent<S, N> for Switch
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> fmt::Result {
        if self.format.load(Ordering::Relaxed) == FORMAT_JSON {
            self.json.format_event(ctx, writer, event)
        } else {
            self.text.format_event(ctx, writer, event)
        }
    }
}

/// Installs the process's subscriber: standard error at `level` in
/// `format` (`RUST_LOG`, when set, wins: see the module docs), and the
/// monitor hub. Returns the control, and a warning to log once logging is
/// up when `RUST_LOG` could not be used.
pub fn init(level: LogLevel, format: LogFormat) -> (LogControl, Option<String>) {
    let mut warning = None;
    let rust_log = match std::env::var("RUST_LOG") {
        Ok(s) if !s.trim().is_empty() => match RustLog::parse(&s) {
            Ok(r) => r,
            Err(e) => {
                warning = Some(format!("{e}; RUST_LOG ignored"));
                RustLog::default()
            }
        },
        _ => RustLog::default(),
    };
    let start_level = rust_log
        .level
        .unwrap_or_else(|| LevelFilter::from_level(level.level()));
    let directives = rust_log.directives(start_level);
    let filter = EnvFilter::builder()
        .parse(&directives)
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let hub = Arc::new(MonitorHub::default());
    let control = LogControl {
        inner: Arc::new(Inner {
            filter: handle,
            format: Arc::new(AtomicU8::new(FORMAT_TEXT)),
            state: Mutex::new((start_level, rust_log)),
            hub: hub.clone(),
        }),
    };
    control.set_format(format);
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let switch = Switch {
        format: control.inner.format.clone(),
        text: tracing_subscriber::fmt::format().with_target(false),
        json: tracing_subscriber::fmt::format()
            .json()
            .with_current_span(false)
            .with_span_list(false),
    };
    let stderr = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .event_format(switch)
        .with_filter(filter);
    let monitor = tracing_subscriber::fmt::layer()
        .json()
        .with_current_span(false)
        .with_span_list(false)
        .with_ansi(false)
        .with_writer(HubWriter(hub.clone()))
        .with_filter(MonitorFilter(hub));
    let installed = tracing_subscriber::registry()
        .with(stderr)
        .with(monitor)
        .try_init();
    if let Err(e) = installed {
        warning = Some(format!("logging was already set up: {e}"));
    }
    (control, warning)
}

/// Lets through what the most verbose monitor asked for.
struct MonitorFilter(Arc<MonitorHub>);

impl<S> Filter<S> for MonitorFilter {
    fn enabled(&self, meta: &Metadata<'_>, _: &Context<'_, S>) -> bool {
        *meta.level() <= self.0.max_level()
    }

    fn callsite_enabled(&self, _: &'static Metadata<'static>) -> tracing::subscriber::Interest {
        // Monitors come and go: ask every time (`enabled` is one load).
        tracing::subscriber::Interest::sometimes()
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(self.0.max_level())
    }
}

/// The monitor layer's writer: each event's line goes to the hub.
struct HubWriter(Arc<MonitorHub>);

/// One event's line, published when the formatter is done with it.
struct HubLine {
    hub: Arc<MonitorHub>,
    level: Level,
    buf: Vec<u8>,
}

impl io::Write for HubLine {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for HubLine {
    fn drop(&mut self) {
        if !self.buf.is_empty() {
            let line = Bytes::from(std::mem::take(&mut self.buf));
            self.hub.publish(self.level, line);
        }
    }
}

impl<'a> MakeWriter<'a> for HubWriter {
    type Writer = HubLine;
    fn make_writer(&'a self) -> HubLine {
        // Not used by the fmt layer (it asks with the event's metadata);
        // a line of unknown level goes to trace monitors only.
        HubLine {
            hub: self.0.clone(),
            level: Level::TRACE,
            buf: Vec::new(),
        }
    }
    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> HubLine {
        HubLine {
            hub: self.0.clone(),
            level: *meta.level(),
            buf: Vec::new(),
        }
    }
}

/// What a monitor reads next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MonitorItem {
    /// One log line (JSON, newline included).
    Line(Bytes),
    /// This many lines did not fit this monitor's backlog.
    Dropped(u64),
}

/// Registry of monitors, each with a level and a bounded backlog.
#[derive(Debug, Default)]
pub struct MonitorHub {
    /// Monitors; std `Mutex`, never held across an `.await`. Lock order:
    /// this, then a monitor's backlog.
    subs: Mutex<Vec<Arc<Monitor>>>,
    /// The most verbose level subscribed (an index, see `filter_index`).
    max: AtomicU8,
    count: AtomicUsize,
    dropped: AtomicU64,
}

#[derive(Debug)]
struct Monitor {
    level: Level,
    backlog: Mutex<MonBacklog>,
    ready: Notify,
}

#[derive(Debug, Default)]
struct MonBacklog {
    items: VecDeque<MonitorItem>,
    lines: usize,
    bytes: usize,
}

impl MonBacklog {
    fn push(&mut self, line: &Bytes) -> bool {
        let fits = self.lines == 0
            || (self.lines < MONITOR_BACKLOG_LINES
                && self.bytes + line.len() <= MONITOR_BACKLOG_BYTES);
        if fits {
            self.lines += 1;
            self.bytes += line.len();
            self.items.push_back(MonitorItem::Line(line.clone()));
        } else if let Some(MonitorItem::Dropped(n)) = self.items.back_mut() {
            *n += 1;
        } else {
            self.items.push_back(MonitorItem::Dropped(1));
        }
        fits
    }

    fn pop(&mut self) -> Option<MonitorItem> {
        let item = self.items.pop_front()?;
        if let MonitorItem::Line(l) = &item {
            self.lines -= 1;
            self.bytes -= l.len();
        }
        Some(item)
    }
}

impl MonitorHub {
    /// The most verbose level any monitor wants (`OFF` with none).
    pub fn max_level(&self) -> LevelFilter {
        index_filter(self.max.load(Ordering::Relaxed))
    }

    /// Monitors now.
    pub fn subscribers(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    /// Lines dropped for slow monitors since start.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Queues `line` (an event at `level`) for every monitor that wants it
    /// and has room. Never waits.
    pub fn publish(&self, level: Level, line: Bytes) {
        let subs = lock(&self.subs);
        let mut dropped = 0;
        for s in subs.iter().filter(|s| level <= s.level) {
            if !lock(&s.backlog).push(&line) {
                dropped += 1;
            }
            s.ready.notify_one();
        }
        if dropped > 0 {
            self.dropped.fetch_add(dropped, Ordering::Relaxed);
        }
    }

    /// A new monitor of lines at `level` and below, from now on.
    pub fn subscribe(self: &Arc<Self>, level: LogLevel) -> MonitorSubscription {
        let mon = Arc::new(Monitor {
            level: level.level(),
            backlog: Mutex::new(MonBacklog::default()),
            ready: Notify::new(),
        });
        lock(&self.subs).push(mon.clone());
        self.recompute();
        MonitorSubscription {
            hub: self.clone(),
            mon,
        }
    }

    fn recompute(&self) {
        let (max, n) = {
            let subs = lock(&self.subs);
            let max = subs
                .iter()
                .map(|s| filter_index(LevelFilter::from_level(s.level)))
                .max()
                .unwrap_or(0);
            (max, subs.len())
        };
        self.count.store(n, Ordering::Relaxed);
        if self.max.swap(max, Ordering::Relaxed) != max {
            // The global level check (`LevelFilter::current`) and the
            // cached per-callsite interest follow the new maximum.
            tracing::callsite::rebuild_interest_cache();
        }
    }
}

/// One monitor's end of the hub; dropping it frees its backlog.
#[derive(Debug)]
pub struct MonitorSubscription {
    hub: Arc<MonitorHub>,
    mon: Arc<Monitor>,
}

impl MonitorSubscription {
    /// The next item, without waiting.
    pub fn try_next(&self) -> Option<MonitorItem> {
        lock(&self.mon.backlog).pop()
    }

    /// The next item, waiting for one. Cancel-safe: an item leaves the
    /// backlog only when it is returned.
    pub async fn next(&self) -> MonitorItem {
        loop {
            if let Some(item) = self.try_next() {
                return item;
            }
            self.mon.ready.notified().await;
        }
    }
}

impl Drop for MonitorSubscription {
    fn drop(&mut self) {
        lock(&self.hub.subs).retain(|s| !Arc::ptr_eq(s, &self.mon));
        self.hub.recompute();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rust_log_splits_into_a_level_and_module_directives() {
        let r = RustLog::parse("debug, transport=trace,node::api").unwrap();
        assert_eq!(r.level, Some(LevelFilter::DEBUG));
        assert_eq!(r.targets, vec!["transport=trace", "node::api"]);
        assert_eq!(
            r.directives(LevelFilter::WARN),
            "warn,transport=trace,node::api"
        );
        assert_eq!(RustLog::parse("").unwrap(), RustLog::default());
        assert!(RustLog::parse("node=loud").is_err());
    }

    #[test]
    fn levels_parse_in_any_case_and_order_by_verbosity() {
        assert_eq!("DEBUG".parse::<LogLevel>(), Ok(LogLevel::Debug));
        assert!("loud".parse::<LogLevel>().is_err());
        assert!(LogLevel::Error < LogLevel::Trace);
        assert_eq!(
            index_filter(filter_index(LevelFilter::WARN)),
            LevelFilter::WARN
        );
        assert_eq!(
            index_filter(filter_index(LevelFilter::OFF)),
            LevelFilter::OFF
        );
    }

    #[test]
    fn each_monitor_gets_its_levels_and_its_own_bounded_backlog() {
        let hub = Arc::new(MonitorHub::default());
        assert_eq!(hub.max_level(), LevelFilter::OFF);
        let info = hub.subscribe(LogLevel::Info);
        let debug = hub.subscribe(LogLevel::Debug);
        assert_eq!(hub.max_level(), LevelFilter::DEBUG);
        hub.publish(Level::DEBUG, Bytes::from_static(b"d\n"));
        hub.publish(Level::WARN, Bytes::from_static(b"w\n"));
        assert_eq!(
            info.try_next(),
            Some(MonitorItem::Line(Bytes::from_static(b"w\n")))
        );
        assert_eq!(info.try_next(), None);
        assert_eq!(
            debug.try_next(),
            Some(MonitorItem::Line(Bytes::from_static(b"d\n")))
        );
        drop(debug);
        assert_eq!(hub.max_level(), LevelFilter::INFO);
        for _ in 0..MONITOR_BACKLOG_LINES + 5 {
            hub.publish(Level::INFO, Bytes::from_static(b"x\n"));
        }
        assert_eq!(hub.dropped(), 5);
        let mut lines = 0;
        while let Some(MonitorItem::Line(_)) = info.try_next() {
            lines += 1;
        }
        assert_eq!(lines, MONITOR_BACKLOG_LINES);
        drop(info);
        assert_eq!((hub.subscribers(), hub.max_level()), (0, LevelFilter::OFF));
    }

    #[test]
    fn a_full_backlog_reports_its_drops_in_place() {
        let hub = Arc::new(MonitorHub::default());
        let m = hub.subscribe(LogLevel::Trace);
        let big = Bytes::from(vec![b'x'; MONITOR_BACKLOG_BYTES / 2]);
        for _ in 0..4 {
            hub.publish(Level::INFO, big.clone());
        }
        assert!(matches!(m.try_next(), Some(MonitorItem::Line(_))));
        assert!(matches!(m.try_next(), Some(MonitorItem::Line(_))));
        assert_eq!(m.try_next(), Some(MonitorItem::Dropped(2)));
        assert_eq!(m.try_next(), None);
    }
}
