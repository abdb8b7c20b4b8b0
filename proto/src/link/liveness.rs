//! An established link, frame by frame: when to ping, the round-trip time,
//! the silence deadline, and why the link ended.

use std::collections::VecDeque;
use std::fmt;
use std::time::{Duration, Instant};

use crate::frame::{AppMessage, FrameError, Goodbye, Message, PeerList, Ping, Reject};
use crate::link::codes::{GoodbyeReason, RejectCode};

/// Which end of the TCP connection this is. Only the dialer pings: one ping
/// stream per link keeps both ends informed, since every frame counts as
/// heard and each ping carries the dialer's last round-trip time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// This end connected.
    Dialer,
    /// This end accepted.
    Acceptor,
}

/// Liveness settings of a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkConfig {
    /// Time between two pings of the dialer.
    pub ping_interval: Duration,
    /// A link on which nothing arrives for this long is closed.
    pub link_timeout: Duration,
    /// Ping rounds fall on `ping_anchor + k * ping_interval`. The driver puts
    /// the anchor on a multiple of the interval of the wall clock, so that a
    /// whole cluster's pings travel together and each node wakes a few times
    /// per round rather than once per link.
    pub ping_anchor: Instant,
}

/// The link timings a node derives from its failure-detector settings
/// (`--suspect-after`, `--dead-after`): the daemon and the simulator take
/// them from here, so that both run the same schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkTiming {
    /// Time between two ping rounds: a third of `suspect_after`, so that a
    /// ping lost once and sent again by TCP (200 ms later at the least)
    /// still arrives before a suspicion, within 20 ms to 1 s.
    pub ping_interval: Duration,
    /// A link silent this long is closed: two thirds of `dead_after`, and at
    /// least three ping rounds.
    pub link_timeout: Duration,
    /// How often the links' liveness reaches the peer table: once per ping
    /// round, at the round (the node is awake then to send its pings, so the
    /// report costs no wake-up of its own). The table also reads the links
    /// at once before it judges a silence, so a report's lag never raises a
    /// suspicion.
    pub liveness_report: Duration,
}

impl LinkTiming {
    /// The timings for `suspect_after` and `dead_after`.
    pub fn derive(suspect_after: Duration, dead_after: Duration) -> LinkTiming {
        let ping_interval =
            (suspect_after / 3).clamp(Duration::from_millis(20), Duration::from_secs(1));
        LinkTiming {
            ping_interval,
            link_timeout: dead_after.mul_f64(2.0 / 3.0).max(ping_interval * 3),
            liveness_report: ping_interval,
        }
    }
}

/// How long an end that closed a link with a farewell (`goodbye`,
/// `reject`) keeps reading after it, for the peer's close. A socket closed
/// with unread data resets the connection, and the reset can overtake the
/// farewell: the peer would see a lost link (and suspect a live node)
/// instead of a graceful close. The peer closes as soon as it reads the
/// farewell, so a drain lasts about one round trip; the bound is for a peer
/// that never does.
pub const FAREWELL_DRAIN: Duration = Duration::from_millis(500);

/// Why this end closed a link itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LocalClose {
    /// This node is leaving: the peer gets a `goodbye`.
    Shutdown,
    /// This link lost the tie-break against another link between the same
    /// two nodes: the peer gets `reject{duplicate}`.
    Duplicate,
    /// Bounded overlay: neither node wants this link any more; the peer
    /// gets `reject{not-neighbour}`, which raises no suspicion.
    NotNeighbour,
    /// The peer stopped reading and our queue to it stayed full.
    Stalled,
    /// The node stopped taking the link's messages.
    Stopping,
    /// Closed by the transport without a more specific reason.
    Dropped,
}

impl LocalClose {
    /// The frame that tells the peer, if this kind of close has one.
    pub fn farewell(self) -> Option<Message> {
        match self {
            LocalClose::Shutdown => Some(Message::Goodbye(Goodbye {
                reason: GoodbyeReason::Shutdown,
            })),
            LocalClose::Duplicate => Some(Message::Reject(Reject {
                code: RejectCode::Duplicate,
                detail: "a link between these nodes already exists".into(),
            })),
            LocalClose::NotNeighbour => Some(Message::Reject(Reject {
                code: RejectCode::NotNeighbour,
                detail: "neither node is a neighbour of the other in the overlay".into(),
            })),
            LocalClose::Stalled | LocalClose::Stopping | LocalClose::Dropped => None,
        }
    }
}

impl fmt::Display for LocalClose {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LocalClose::Shutdown => "closed: shutdown",
            LocalClose::Duplicate => "closed: duplicate link",
            LocalClose::NotNeighbour => "closed: not a neighbour",
            LocalClose::Stalled => "closed: the peer stopped reading",
            LocalClose::Stopping => "closed: node stopping",
            LocalClose::Dropped => "closed",
        })
    }
}

/// Why a link ended. Each variant says whether the end was on purpose
/// ([`CloseReason::is_graceful`]) and whether it is a counted drop
/// ([`CloseReason::drop_reason`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// The peer said goodbye: it is leaving. Graceful.
    Goodbye(GoodbyeReason),
    /// The peer sent `reject`. With [`RejectCode::Duplicate`] the link lost
    /// the tie-break and another link between the same nodes carries on
    /// (graceful); any other code is a refusal (not graceful).
    Rejected {
        /// The peer's code.
        code: RejectCode,
        /// The peer's explanation.
        detail: String,
    },
    /// Nothing arrived for this long ([`LinkConfig::link_timeout`]): how a
    /// silent loss (cable pulled, partition, frozen process) ends a link.
    Silent(Duration),
    /// The peer closed the stream.
    Eof,
    /// Reading the stream failed (reset, ...). Counted as `io`.
    Io(String),
    /// A frame did not decode; the stream position is lost. Counted by the
    /// frame error's reason.
    BadFrame {
        /// The frame error's drop-counter label.
        reason: &'static str,
        /// The error, for logs.
        detail: String,
    },
    /// A `hello` or `welcome` on an established link. Counted as
    /// `handshake_after_handshake`.
    UnexpectedHandshake,
    /// This end closed the link.
    Local(LocalClose),
}

impl CloseReason {
    /// The peer said goodbye (it is leaving, not lost).
    pub fn is_goodbye(&self) -> bool {
        matches!(self, CloseReason::Goodbye(_))
    }

    /// Closed on purpose (a goodbye, the duplicate tie-break, our own
    /// shutdown), not lost.
    pub fn is_graceful(&self) -> bool {
        match self {
            CloseReason::Goodbye(_) => true,
            CloseReason::Rejected { code, .. } => {
                matches!(code, RejectCode::Duplicate | RejectCode::NotNeighbour)
            }
            CloseReason::Local(l) => matches!(
                l,
                LocalClose::Shutdown | LocalClose::Duplicate | LocalClose::NotNeighbour
            ),
            CloseReason::Silent(_)
            | CloseReason::Eof
            | CloseReason::Io(_)
            | CloseReason::BadFrame { .. }
            | CloseReason::UnexpectedHandshake => false,
        }
    }

    /// This end closed with a farewell frame (`goodbye`, `reject`): it then
    /// reads on until the peer closes too, for at most [`FAREWELL_DRAIN`].
    pub fn sent_farewell(&self) -> bool {
        matches!(self, CloseReason::Local(why) if why.farewell().is_some())
    }

    /// The drop-counter label when the end was the peer's fault.
    pub fn drop_reason(&self) -> Option<&'static str> {
        match self {
            CloseReason::Io(_) => Some("io"),
            CloseReason::BadFrame { reason, .. } => Some(reason),
            CloseReason::UnexpectedHandshake => Some("handshake_after_handshake"),
            CloseReason::Goodbye(_)
            | CloseReason::Rejected { .. }
            | CloseReason::Silent(_)
            | CloseReason::Eof
            | CloseReason::Local(_) => None,
        }
    }
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CloseReason::Goodbye(r) => write!(f, "goodbye: {r}"),
            CloseReason::Rejected {
                code: RejectCode::Duplicate,
                ..
            } => f.write_str("duplicate link"),
            CloseReason::Rejected { code, detail } => write!(f, "rejected ({code}): {detail}"),
            CloseReason::Silent(d) => write!(f, "silent for {d:?}"),
            CloseReason::Eof => f.write_str("connection closed"),
            CloseReason::Io(e) => write!(f, "connection failed: {e}"),
            CloseReason::BadFrame { detail, .. } => write!(f, "bad frame: {detail}"),
            CloseReason::UnexpectedHandshake => {
                f.write_str("handshake frame on an established link")
            }
            CloseReason::Local(l) => l.fmt(f),
        }
    }
}

/// What an established link hands to the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkEvent {
    /// An application message arrived.
    App(AppMessage),
    /// A peer-list message (probe or report) arrived.
    Peers(PeerList),
    /// A query or query response arrived.
    Query(crate::query::QueryMessage),
    /// A message relayed over the overlay arrived.
    Relay(crate::overlay::flood::Relayed),
    /// The link ended; the machine takes no more input and this is its
    /// last event.
    Closed(CloseReason),
}

/// The liveness machine of one established link (after its
/// [`Handshake`](crate::link::Handshake)).
///
/// Inputs: [`Link::on_frame`] for every decoded frame, [`Link::on_error`]
/// and [`Link::on_eof`] from the stream, [`Link::on_timeout`] when
/// [`Link::next_deadline`] passes, [`Link::close`] to end it from this side.
/// Outputs: frames to send ([`Link::poll_transmit`]: pings, pongs and a
/// farewell) and [`LinkEvent`]s ([`Link::poll_event`]). Drain both after
/// every input. Application messages from this side do not pass through
/// the machine: they need no decision, only encoding.
#[derive(Debug)]
pub struct Link {
    role: Role,
    cfg: LinkConfig,
    /// Origin of the ping timestamps (`ts_us`).
    started: Instant,
    last_heard: Instant,
    /// The dialer's next ping round.
    next_ping: Option<Instant>,
    seq: u64,
    rtt: Option<Duration>,
    transmits: VecDeque<Message>,
    events: VecDeque<LinkEvent>,
    closed: Option<CloseReason>,
    /// After a late timer (this process was stopped or starved), silence is
    /// not judged before this: the frames waiting in the socket come first.
    grace_until: Option<Instant>,
}

impl Link {
    /// A link established at `now`. The dialer's first ping goes out at
    /// once, so that the round-trip time is known as soon as the link is up;
    /// later ones on the rounds of [`LinkConfig::ping_anchor`].
    pub fn new(now: Instant, role: Role, cfg: LinkConfig) -> Link {
        let mut link = Link {
            role,
            cfg,
            started: now,
            last_heard: now,
            next_ping: None,
            seq: 0,
            rtt: None,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            closed: None,
            grace_until: None,
        };
        if role == Role::Dialer {
            link.ping(now);
        }
        link
    }

    /// This end's role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The round-trip time: measured from pongs by the dialer, learnt from
    /// the dialer's pings by the acceptor.
    pub fn rtt(&self) -> Option<Duration> {
        self.rtt
    }

    /// When a frame last arrived (the link's start before any did).
    pub fn last_heard(&self) -> Instant {
        self.last_heard
    }

    /// Why the link ended, once it has.
    pub fn close_reason(&self) -> Option<&CloseReason> {
        self.closed.as_ref()
    }

    /// The link has ended.
    pub fn is_closed(&self) -> bool {
        self.closed.is_some()
    }

    /// Application data arrived at `now` that the driver hands on itself
    /// (the hot path): it needs no decision, and counts as heard like any
    /// frame. Returns false once the link is closed: then the data is to be
    /// dropped, as [`Link::on_frame`] would.
    pub fn on_data(&mut self, now: Instant) -> bool {
        if self.closed.is_some() {
            return self.hands_on();
        }
        self.last_heard = self.last_heard.max(now);
        true
    }

    /// A frame arrived at `now`. Every frame counts as heard; application
    /// messages come back out as [`LinkEvent::App`] (or see
    /// [`Link::on_data`]).
    pub fn on_frame(&mut self, now: Instant, msg: Message) {
        if self.closed.is_some() {
            if self.hands_on() {
                self.hand_on(msg);
            }
            return;
        }
        self.last_heard = self.last_heard.max(now);
        match msg {
            Message::Ping(p) => {
                if p.rtt_us > 0 {
                    self.rtt = Some(Duration::from_micros(p.rtt_us));
                }
                self.transmits.push_back(Message::Pong(p));
            }
            Message::Pong(p) => {
                // A timestamp from our future is not an echo of ours: ignored.
                let sent = self.started + Duration::from_micros(p.ts_us);
                if let Some(rtt) = now.checked_duration_since(sent) {
                    self.rtt = Some(rtt.max(Duration::from_micros(1)));
                }
            }
            Message::Goodbye(g) => self.end(CloseReason::Goodbye(g.reason)),
            Message::Reject(r) => self.end(CloseReason::Rejected {
                code: r.code,
                detail: r.detail,
            }),
            Message::Hello(_) | Message::Welcome(_) => self.end(CloseReason::UnexpectedHandshake),
            data => self.hand_on(data),
        }
    }

    /// Closed here as a duplicate: another link between the same two nodes
    /// carries on, and what the peer sent on this one before our reject
    /// reached it (a member list, a verdict to refute, messages) is still
    /// its word. The driver keeps reading for it (the farewell's drain) and
    /// the machine still passes on application messages, member lists,
    /// queries and relays; pings, pongs and the peer's own close are moot.
    pub fn hands_on(&self) -> bool {
        matches!(self.closed, Some(CloseReason::Local(LocalClose::Duplicate)))
    }

    /// A data frame, as an event for the node (anything else is dropped).
    fn hand_on(&mut self, msg: Message) {
        let event = match msg {
            Message::App(m) => LinkEvent::App(m),
            Message::Peers(list) => LinkEvent::Peers(list),
            Message::Query(q) => LinkEvent::Query(crate::query::QueryMessage::Query(q)),
            Message::QueryResponse(r) => LinkEvent::Query(crate::query::QueryMessage::Response(r)),
            Message::Relay(r) => LinkEvent::Relay(r),
            _ => return,
        };
        self.events.push_back(event);
    }

    /// The stream failed to yield a frame: a decode error, or an IO error
    /// wrapped as [`FrameError::Io`].
    pub fn on_error(&mut self, _now: Instant, error: &FrameError) {
        let reason = match error {
            FrameError::Io(e) => CloseReason::Io(e.to_string()),
            other => CloseReason::BadFrame {
                reason: other.reason(),
                detail: other.to_string(),
            },
        };
        self.end(reason);
    }

    /// The peer closed the stream.
    pub fn on_eof(&mut self, _now: Instant) {
        self.end(CloseReason::Eof);
    }

    /// Time passed: closes a silent link, or sends the ping of a round that
    /// has come. A late call sends one ping, not one per missed round.
    ///
    /// A call that comes well past the deadline (by more than a quarter of
    /// the link timeout) means *this* process was late — stopped, paused,
    /// starved — not that the peer fell silent: the verdict then waits half
    /// a link timeout more, so that what arrived meanwhile is read first.
    pub fn on_timeout(&mut self, now: Instant) {
        if self.closed.is_some() {
            return;
        }
        if let Some(due) = self.next_deadline() {
            if now > due + self.cfg.link_timeout / 4 {
                self.grace_until = Some(now + self.cfg.link_timeout / 2);
            }
        }
        let grace = self.grace_until.is_some_and(|g| now < g);
        if !grace && now >= self.last_heard + self.cfg.link_timeout {
            self.end(CloseReason::Silent(self.cfg.link_timeout));
            return;
        }
        if self.next_ping.is_some_and(|t| now >= t) {
            self.ping(now);
        }
    }

    /// Ends the link from this side; its farewell frame, if any
    /// ([`LocalClose::farewell`]), is the last transmit.
    pub fn close(&mut self, _now: Instant, why: LocalClose) {
        if self.closed.is_some() {
            return;
        }
        if let Some(frame) = why.farewell() {
            self.transmits.push_back(frame);
        }
        self.end(CloseReason::Local(why));
    }

    /// When [`Link::on_timeout`] is next due; `None` once closed.
    pub fn next_deadline(&self) -> Option<Instant> {
        if self.closed.is_some() {
            return None;
        }
        let mut silence = self.last_heard + self.cfg.link_timeout;
        if let Some(g) = self.grace_until {
            silence = silence.max(g);
        }
        Some(self.next_ping.map_or(silence, |p| p.min(silence)))
    }

    /// When a driver that wakes on timers should wake this machine: the
    /// last ping round at or before [`Link::next_deadline`] while that round
    /// is still after `now`, else the deadline itself.
    ///
    /// The silence deadline moves later with every frame heard, so a timer
    /// set for it nearly always finds nothing due, and at a moment of its
    /// own: an acceptor's link would wake its node about once per
    /// `link_timeout` at a random phase. On a round the node is awake anyway
    /// (its pings and the links' report to the table fall there), so the
    /// early look costs nothing; a deadline that does come is still met to
    /// the instant, by the second wake-up.
    pub fn next_wake(&self, now: Instant) -> Option<Instant> {
        let due = self.next_deadline()?;
        let round = next_round(self.cfg.ping_anchor, self.cfg.ping_interval, due)
            .checked_sub(self.cfg.ping_interval);
        Some(round.filter(|&r| r > now).unwrap_or(due))
    }

    /// The next frame to send.
    pub fn poll_transmit(&mut self) -> Option<Message> {
        self.transmits.pop_front()
    }

    /// The next event for the node.
    pub fn poll_event(&mut self) -> Option<LinkEvent> {
        self.events.pop_front()
    }

    fn end(&mut self, reason: CloseReason) {
        if self.closed.is_none() {
            self.closed = Some(reason.clone());
            self.next_ping = None;
            self.events.push_back(LinkEvent::Closed(reason));
        }
    }

    fn ping(&mut self, now: Instant) {
        self.seq += 1;
        let ts_us = now.saturating_duration_since(self.started).as_micros() as u64;
        let rtt_us = self.rtt.map_or(0, |d| (d.as_micros() as u64).max(1));
        self.transmits.push_back(Message::Ping(Ping {
            seq: self.seq,
            ts_us,
            rtt_us,
        }));
        self.next_ping = Some(next_round(
            self.cfg.ping_anchor,
            self.cfg.ping_interval,
            now,
        ));
    }
}

/// The first instant of the form `anchor + k * every` (k any integer)
/// strictly after `now`.
pub fn next_round(anchor: Instant, every: Duration, now: Instant) -> Instant {
    let every_ns = every.as_nanos().max(1);
    match now.checked_duration_since(anchor) {
        Some(since) => {
            let k = since.as_nanos() / every_ns + 1;
            anchor + nanos(k * every_ns)
        }
        None => {
            // The anchor is ahead: count rounds back from it.
            let ahead = anchor.duration_since(now).as_nanos();
            let k = (ahead - 1) / every_ns;
            anchor - nanos(k * every_ns)
        }
    }
}

/// The round `anchor + k * every` nearest to `t` (the later one of two
/// equally near).
pub fn nearest_round(anchor: Instant, every: Duration, t: Instant) -> Instant {
    let after = next_round(anchor, every, t);
    match after.checked_sub(every) {
        Some(before) if t - before < after - t => before,
        _ => after,
    }
}

/// The monotonic instant of the last multiple of `every` of the wall clock
/// at or before `now`, given the wall clock's reading at `now`
/// (`since_epoch`). Every node anchors its ping rounds this way, so that a
/// cluster's pings and pongs travel together and each node wakes a few
/// times per round instead of once per link; discovery puts its periodic
/// beacons on the same rounds. A driver takes it once: a wall-clock step
/// later moves no round (rounds stay evenly spaced), which matters more
/// than staying in phase with other nodes.
pub fn wall_clock_anchor(now: Instant, since_epoch: Duration, every: Duration) -> Instant {
    let every_ns = every.as_nanos().max(1);
    // Below `every`, so it fits in u64 for any sane interval.
    let into_round = (since_epoch.as_nanos() % every_ns) as u64;
    now.checked_sub(Duration::from_nanos(into_round))
        .unwrap_or(now)
}

fn nanos(n: u128) -> Duration {
    // Rounds are at most a few intervals away from `now`: far below
    // u64::MAX nanoseconds (584 years).
    Duration::from_nanos(n.min(u64::MAX as u128) as u64)
}
