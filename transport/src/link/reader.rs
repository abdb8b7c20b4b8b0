//! The reader loop of a link: bytes from the socket into the link's
//! machine, the machine's events to the node.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use proto::frame::{AppMessage, Decoded, FrameCodec, FrameError};
use proto::link::{CloseReason, Link, LinkEvent, LocalClose};
use proto::{Message, NodeId};
use tokio::io::AsyncReadExt;
use tokio::net::tcp::OwnedReadHalf;
use tokio::sync::mpsc::{self, error::TrySendError};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::{add, Cause, Env, LinkCounters, Shared, MESSAGE_BATCH_BYTES, MESSAGE_BATCH_LEN};
use crate::config::{now, tokio_instant};
use crate::event::TransportEvent;
use crate::inbox::{LinkClosed, ToActor};

/// Most frames decoded before their events are delivered: bounds the
/// pending messages whatever the size of a read (and so the length of a
/// batch of messages).
const DECODE_BATCH: usize = MESSAGE_BATCH_LEN;
/// Room made in the read buffer of a busy link: one read takes up to this
/// much, so a stream of small frames costs one syscall per few hundred
/// frames.
const READ_ROOM: usize = 64 << 10;
/// Room of a quiet link (reads of pings and pongs): a link's buffer shrinks
/// back to this once a burst is over, so idle links cost a few KiB each.
const IDLE_ROOM: usize = 4 << 10;
/// A read of fewer bytes than this is small.
const QUIET_READ: usize = 1 << 10;
/// This many small reads in a row make a link quiet (a single small read
/// also happens mid-stream, at a frame's tail).
pub(super) const QUIET_AFTER: u32 = 8;

/// Full reads in a row (each took all the room it was given and completed
/// a frame) that make a quiet link busy: a stream is waiting behind them.
/// A single large frame (the member list a link gets when it comes up) is
/// not a stream: its first read completes nothing, and the decoder makes
/// room for its rest, so a quiet link takes it without [`READ_ROOM`].
/// (Turning busy at any read of 1 KiB or more grew the buffer of nearly
/// every new link to [`READ_ROOM`] while a node joined: a peak of 64 KiB
/// per link that the allocator keeps.)
const STREAM_AFTER: u32 = 2;

/// The count of full reads in a row (see [`STREAM_AFTER`]) after one that
/// `filled` its room and completed `frames` frames.
fn full_reads(before: u32, filled: bool, frames: usize) -> u32 {
    if filled && frames > 0 {
        before.saturating_add(1)
    } else {
        0
    }
}

pub(super) struct Reader {
    pub peer: NodeId,
    pub conn: u64,
    pub rd: OwnedReadHalf,
    /// Bytes read and not yet decoded (the handshake's leftovers first).
    pub buf: BytesMut,
    pub decoder: FrameCodec,
    pub machine: Link,
    /// The writer's lane for pings and pongs.
    pub control: mpsc::Sender<Message>,
    pub shared: Arc<Shared>,
    pub counters: Arc<LinkCounters>,
    pub env: Arc<Env>,
    pub cancel: CancellationToken,
    /// Application messages decoded and not yet delivered: the next
    /// [`TransportEvent::Messages`]. Handed over whole, so it has no
    /// capacity between batches (an idle link holds none).
    pub apps: Vec<AppMessage>,
    /// Their payload bytes.
    pub app_bytes: usize,
    /// The length of the last batch: the room the next one starts with.
    pub batch_hint: usize,
    /// Reads in a row that brought little (see [`QUIET_AFTER`]).
    pub small_reads: u32,
    /// The last read took all the room it was given.
    pub filled: bool,
    /// Full reads in a row (see [`STREAM_AFTER`]).
    pub full_reads: u32,
}

/// Runs the reader until the link ends, then reports why to the actor.
pub(super) async fn run(mut r: Reader) {
    // Whatever ends this task (even a panic) ends the writer too.
    let _teardown = r.cancel.clone().drop_guard();
    let reason = r.read_loop().await;
    r.cancel.cancel(); // the writer stops before the actor hears of it
    if let Some(label) = reason.drop_reason() {
        r.env.stats.drops.record(now(), label);
    }
    debug!(peer = %r.peer.short(), %reason, "link reader ended");
    let drain = reason.sent_farewell();
    let closed = ToActor::Closed(LinkClosed {
        id: r.peer,
        conn: r.conn,
        reason,
    });
    if r.env.inbox.send(closed).await.is_err() {
        debug!(peer = %r.peer.short(), "transport gone before link close was reported");
    }
    if drain {
        r.drain().await;
    }
}

impl Reader {
    async fn read_loop(&mut self) -> CloseReason {
        // One timer for the link's life, set for the machine's next wake-up
        // (a ping round before its silence deadline, see `Link::next_wake`):
        // that moves once per round, not with every read, so a busy link
        // does not pay a timer update per read.
        let mut armed = self.machine.next_wake(now());
        let sleep = tokio::time::sleep_until(tokio_instant(armed));
        tokio::pin!(sleep);
        loop {
            if let Err(reason) = self.process(now()).await {
                return reason;
            }
            let next = self.machine.next_wake(now());
            if next.is_some() && next != armed {
                sleep.as_mut().reset(tokio_instant(next));
                armed = next;
            }
            self.make_room();
            let room = self.buf.capacity() - self.buf.len();
            // The timer before the socket: under a steady inbound stream the
            // read is always ready, and the dialer's pings must not starve.
            tokio::select! {
                biased;
                () = self.cancel.cancelled() => self.closed_here(now()),
                () = &mut sleep => {
                    armed = None;
                    self.machine.on_timeout(now());
                }
                read = self.rd.read_buf(&mut self.buf) => match read { // cancel-safe
                    Ok(0) => self.machine.on_eof(now()),
                    // Decoded at the top of the loop, which also decides
                    // whether a quiet link turns busy.
                    Ok(n) => {
                        self.filled = n == room;
                        if n < QUIET_READ {
                            self.small_reads = self.small_reads.saturating_add(1);
                        } else if self.small_reads < QUIET_AFTER {
                            self.small_reads = 0; // still busy
                        }
                    }
                    Err(e) => self.machine.on_error(now(), &FrameError::Io(e)),
                },
            }
        }
    }

    /// Makes room for the next read: [`READ_ROOM`] unless the link is
    /// quiet, then [`IDLE_ROOM`]. An empty buffer grown by a burst
    /// is swapped for a small one once the link is quiet again (its old
    /// bytes may still be shared by messages the node holds); a small one
    /// is reused in place.
    fn make_room(&mut self) {
        let spare = self.buf.capacity() - self.buf.len();
        if self.small_reads < QUIET_AFTER {
            if spare < READ_ROOM / 16 {
                self.buf.reserve(READ_ROOM);
            }
            return;
        }
        if self.buf.is_empty() && self.buf.capacity() > 2 * IDLE_ROOM {
            self.buf = BytesMut::with_capacity(IDLE_ROOM);
        } else if spare < IDLE_ROOM / 4 {
            self.buf.reserve(IDLE_ROOM);
        }
    }

    /// The link's token fired: records why in the machine.
    fn closed_here(&mut self, now: Instant) {
        match self.shared.take_cause() {
            Some(Cause::Local(why)) => self.machine.close(now, why),
            Some(Cause::WriteFailed(e)) => self.machine.on_error(now, &FrameError::Io(e)),
            None => self.machine.close(now, LocalClose::Dropped),
        }
    }

    /// After this end's farewell: reads until the peer closes, or for the
    /// transport's `farewell_drain` ([`proto::link::FAREWELL_DRAIN`] by
    /// default), so that the socket is not closed with unread data, which
    /// would reset the connection. What arrives is dropped, except on a
    /// link closed as a duplicate ([`Link::hands_on`]): the peer's frames
    /// sent before our reject reached it go to the node, as the other
    /// link's would, since the peer never resends them.
    async fn drain(&mut self) {
        let hand_on = self.machine.hands_on();
        let limit = self.env.farewell_drain;
        let read_to_end = async {
            loop {
                if !hand_on {
                    self.buf.clear();
                } else if self.decode_all(now(), &mut 0).await.is_err() {
                    return; // a bad frame, or the node is gone
                }
                if self.buf.capacity() - self.buf.len() < IDLE_ROOM / 4 {
                    self.buf.reserve(IDLE_ROOM);
                }
                match self.rd.read_buf(&mut self.buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        };
        let _peer_closed_or_timed_out = tokio::time::timeout(limit, read_to_end).await;
    }

    /// Decodes every whole frame in the buffer, all heard at `now` (the
    /// time of the read): application messages go to the node in batches
    /// (the machine only notes that the peer was heard), every other frame
    /// to the machine, whose output is passed on. `Err` once the machine
    /// has closed, with why.
    async fn process(&mut self, now: Instant) -> Result<(), CloseReason> {
        let mut decoded = 0;
        let result = self.decode_all(now, &mut decoded).await;
        self.full_reads = full_reads(self.full_reads, std::mem::take(&mut self.filled), decoded);
        if self.full_reads >= STREAM_AFTER {
            self.small_reads = 0;
        }
        result
    }

    /// [`Reader::process`], counting the frames decoded into `decoded`.
    async fn decode_all(&mut self, now: Instant, decoded: &mut usize) -> Result<(), CloseReason> {
        loop {
            let (mut frames, mut msgs, mut bytes) = (0usize, 0u64, 0u64);
            let reading = |m: &Link| !m.is_closed() || m.hands_on();
            while reading(&self.machine) && frames < DECODE_BATCH {
                match self.decoder.decode_next(&mut self.buf) {
                    Ok(Some(Decoded::App(msg))) => {
                        frames += 1;
                        msgs += 1;
                        let len = msg.payload.len();
                        bytes += len as u64;
                        if self.apps.capacity() == 0 {
                            self.apps.reserve(self.batch_hint);
                        }
                        self.apps.push(msg);
                        self.app_bytes += len;
                        if self.app_bytes >= MESSAGE_BATCH_BYTES {
                            self.flush_apps(now).await?;
                        }
                    }
                    Ok(Some(Decoded::Frame(frame))) => {
                        frames += 1;
                        self.flush_apps(now).await?;
                        self.machine.on_frame(now, *frame);
                        // Its output goes before any later message, so
                        // the node sees the link's frames in their order.
                        self.pass_on().await?;
                    }
                    Ok(None) => break,
                    Err(e) => {
                        self.flush_apps(now).await?;
                        if self.machine.is_closed() {
                            return Err(self.end_reason()); // draining: stop here
                        }
                        self.machine.on_error(now, &e);
                    }
                }
            }
            if frames > 0 {
                self.count(frames as u64, msgs, bytes);
            }
            *decoded += frames;
            self.flush_apps(now).await?;
            self.pass_on().await?;
            if frames < DECODE_BATCH {
                return Ok(());
            }
            // A full batch: more are buffered. Let the node take these
            // first, so that they are handled while still in cache rather
            // than after thousands more.
            tokio::task::yield_now().await;
        }
    }

    /// Delivers the application messages decoded so far, in order and in
    /// one event, unless the link has closed meanwhile.
    async fn flush_apps(&mut self, now: Instant) -> Result<(), CloseReason> {
        self.app_bytes = 0;
        if self.apps.is_empty() || !self.machine.on_data(now) {
            self.apps.clear();
            return Ok(());
        }
        let msgs = std::mem::take(&mut self.apps);
        self.batch_hint = msgs.len();
        let event = TransportEvent::Messages {
            id: self.peer,
            msgs,
        };
        // The fast path stays synchronous: no future is built.
        if let Err(full) = self.env.events.try_send(event) {
            self.deliver(full).await?;
        }
        Ok(())
    }

    /// The machine's output: pings and pongs to the writer, events to the
    /// node.
    async fn pass_on(&mut self) -> Result<(), CloseReason> {
        if self.machine.is_closed() {
            // Farewells are the writer's: the actor queues them behind the
            // data. Nothing else is worth sending now.
            while self.machine.poll_transmit().is_some() {}
        }
        while let Some(frame) = self.machine.poll_transmit() {
            // Full lane: the writer is stuck; an unanswered ping is what an
            // overloaded link should look like.
            if self.control.try_send(frame).is_err() {
                debug!(peer = %self.peer.short(), "control frame skipped: writer busy");
            }
        }
        while let Some(event) = self.machine.poll_event() {
            let event = match event {
                LinkEvent::App(msg) => TransportEvent::Messages {
                    id: self.peer,
                    msgs: vec![msg],
                },
                LinkEvent::Peers(list) => TransportEvent::Peers {
                    id: self.peer,
                    list,
                },
                LinkEvent::Query(msg) => TransportEvent::Query { id: self.peer, msg },
                LinkEvent::Relay(msg) => TransportEvent::Relay { id: self.peer, msg },
                LinkEvent::Closed(reason) => return Err(reason),
            };
            if let Err(full) = self.env.events.try_send(event) {
                self.deliver(full).await?;
            }
        }
        Ok(())
    }

    /// One batch of frames into the counters: the node and the actor read
    /// them whenever they like, so once per batch is enough.
    fn count(&self, frames: u64, msgs: u64, bytes: u64) {
        let (env, c) = (&self.env, &self.counters);
        env.stats.frames_in.fetch_add(frames, Ordering::Relaxed);
        add(&c.msgs_in, &c.bytes_in, msgs, bytes);
        let heard = self
            .machine
            .last_heard()
            .saturating_duration_since(env.epoch)
            .as_micros() as u64;
        c.heard_us.store(heard.max(1), Ordering::Relaxed);
        if let Some(rtt) = self.machine.rtt() {
            c.rtt_us
                .store((rtt.as_micros() as u64).max(1), Ordering::Relaxed);
        }
    }

    /// Hands an event that found the node's queue full (or closed) to the
    /// node, waiting for room: a node that cannot keep up slows its links'
    /// readers (backpressure). Only the link's own end interrupts the wait.
    async fn deliver(&mut self, refused: TrySendError<TransportEvent>) -> Result<(), CloseReason> {
        let event = match refused {
            TrySendError::Closed(_) => return Err(self.stopping()),
            TrySendError::Full(event) => event,
        };
        // Racing the send against the token loses at most this event, on a
        // link that is ending anyway. A link already closed (draining, see
        // `drain`) just waits: its drain is bounded in time.
        let open = !self.machine.is_closed();
        let sent = tokio::select! {
            biased;
            () = self.cancel.cancelled(), if open => None,
            sent = self.env.events.send(event) => Some(sent.is_ok()),
        };
        match sent {
            Some(true) => Ok(()),
            Some(false) => Err(self.stopping()),
            None => {
                self.closed_here(now());
                Err(self.end_reason())
            }
        }
    }

    /// The node dropped its end of the events channel.
    fn stopping(&mut self) -> CloseReason {
        self.machine.close(now(), LocalClose::Stopping);
        self.end_reason()
    }

    fn end_reason(&self) -> CloseReason {
        self.machine
            .close_reason()
            .cloned()
            .unwrap_or(CloseReason::Local(LocalClose::Dropped))
    }
}

#[cfg(test)]
mod tests {
    use super::{full_reads, STREAM_AFTER};

    fn busy(reads: &[(bool, usize)]) -> bool {
        let mut n = 0;
        reads.iter().any(|&(filled, frames)| {
            n = full_reads(n, filled, frames);
            n >= STREAM_AFTER
        })
    }

    #[test]
    fn only_full_reads_in_a_row_make_a_stream() {
        // Small frames filling the room, read after read.
        assert!(busy(&[(true, 40), (true, 40)]));
        // A stream of frames larger than the room: a read that completes
        // one and starts the next, twice.
        assert!(busy(&[(true, 0), (true, 1), (true, 1)]));
        // One large frame and a few small ones behind it: the first read
        // completes nothing, the last leaves room.
        assert!(!busy(&[(true, 0), (true, 1), (false, 3)]));
        // Reads that leave room: the reader keeps up as it is.
        assert!(!busy(&[(false, 40), (false, 40), (false, 40)]));
        // A full read between ones that are not is no stream.
        assert!(!busy(&[(true, 5), (false, 1), (true, 5), (false, 1)]));
    }
}
