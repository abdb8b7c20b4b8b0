//! The writer loop of a link: the only code that writes its socket.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use proto::frame::{AppMessage, FrameCodec, FrameError};
use proto::{Message, NodeId};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::mpsc;
use tokio_util::codec::Encoder;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::{add, Cause, LinkCounters, Outbound, Shared};
use crate::config::now;
use crate::stats::Stats;

/// Most queued messages written at once: the batch that shares one write
/// (and on a secured link one seal), as `PROTOCOL.md` documents.
const WRITE_BATCH: usize = 64;
/// The writer's buffer of taken messages gives its room back once idle
/// if a burst grew it past this many.
const KEEP_ITEMS: usize = 256;
/// Most encoded bytes held before they are written, so that a batch of
/// large messages is written in pieces instead of buffered whole.
const WRITE_CHUNK: usize = 256 << 10;
/// The output buffer is kept between writes, but not once a huge frame has
/// grown it past this.
const KEEP_BUF: usize = 4 * WRITE_CHUNK;
/// The output buffer a link starts with, and goes back to once quiet.
const OUT_ROOM: usize = 4 << 10;
/// A write of fewer bytes than this is small (pings and pongs).
const QUIET_WRITE: usize = 1 << 10;
/// This many small writes in a row make a link quiet: an output buffer
/// grown past [`OUT_ROOM`] (by the member list sent when the link came up,
/// or a burst) is then given back. A busy link keeps its buffer.
const QUIET_AFTER: u32 = 8;
/// How long the closing FIN may take.
const CLOSE_WAIT: Duration = Duration::from_millis(200);

pub(super) struct Writer {
    pub peer: NodeId,
    pub wr: OwnedWriteHalf,
    pub encoder: FrameCodec,
    /// Secured links seal each written group as records.
    pub secured: bool,
    /// The link's queue.
    pub queue: super::queue::Rx<Outbound>,
    /// Pings and pongs from the reader.
    pub control: mpsc::Receiver<Message>,
    pub shared: Arc<Shared>,
    pub counters: Arc<LinkCounters>,
    pub stats: Arc<Stats>,
    pub cancel: CancellationToken,
}

/// What is staged for the next write.
struct Group {
    /// Encoded frames (plaintext links) or sealed records.
    out: BytesMut,
    /// A secured link's frames, sealed together on flush.
    frames: Vec<Message>,
    /// Roughly how many bytes are staged.
    staged: usize,
    /// Frames, application messages and their payload bytes encoded
    /// (counted once written).
    n_frames: u64,
    n_apps: u64,
    app_bytes: u64,
    /// The same, of `frames` (not encoded yet).
    held: (u64, u64, u64),
    /// Small writes in a row (see [`QUIET_AFTER`]).
    small_writes: u32,
}

/// Why the loop stopped writing.
enum Stop {
    /// The token fired: someone else ends the link.
    Cancelled,
    /// A farewell was written, or every handle is gone: close cleanly.
    Done,
}

/// Runs the writer until the link ends.
pub(super) async fn run(mut w: Writer) {
    // Whatever ends this task (even a panic) ends the reader too.
    let _teardown = w.cancel.clone().drop_guard();
    match w.write_loop().await {
        Ok(Stop::Done) => {
            // Best effort FIN; the peer may already be gone, and one not
            // reading gets its half closed when we drop it anyway.
            if let Ok(Err(error)) = tokio::time::timeout(CLOSE_WAIT, w.wr.shutdown()).await {
                debug!(peer = %w.peer.short(), %error, "link close failed");
            }
        }
        Ok(Stop::Cancelled) => {}
        Err(error) => {
            debug!(peer = %w.peer.short(), %error, "link write failed");
            w.shared.set_cause(Cause::WriteFailed(error));
        }
    }
}

impl Writer {
    async fn write_loop(&mut self) -> std::io::Result<Stop> {
        // What the writer took from the queue (all of it, at once) and has
        // not written yet.
        let mut batch: VecDeque<Outbound> = VecDeque::new();
        let mut control: Vec<Message> = Vec::new();
        let mut g = Group {
            // Grows with the batches it carries (up to `KEEP_BUF`, and
            // only while busy); most links only ever write pings and pongs.
            out: BytesMut::with_capacity(OUT_ROOM),
            frames: Vec::new(),
            staged: 0,
            n_frames: 0,
            n_apps: 0,
            app_bytes: 0,
            held: (0, 0, 0),
            small_writes: 0,
        };
        // False once every handle is gone (after what they queued).
        let mut queue_open = true;
        loop {
            if batch.is_empty() && queue_open {
                if let Some(n) = self.queue.try_recv_all(&mut batch) {
                    queue_open = n > 0;
                }
            }
            if batch.is_empty() && queue_open && control.is_empty() {
                // Nothing to write: a burst's room goes back before sleeping.
                if batch.capacity() > KEEP_ITEMS {
                    batch = VecDeque::new();
                }
                // Every arm is cancel-safe (`recv`, `recv_all`, `cancelled`).
                tokio::select! {
                    biased;
                    () = self.cancel.cancelled() => return Ok(Stop::Cancelled),
                    Some(frame) = self.control.recv() => control.push(frame),
                    n = self.queue.recv_all(&mut batch) => queue_open = n > 0,
                }
            }
            // Take what else is ready, without waiting.
            while let Ok(frame) = self.control.try_recv() {
                control.push(frame);
            }
            // Pings and pongs first: small, and their timing is measured.
            for frame in control.drain(..) {
                self.stage(&mut g, frame);
            }
            let mut ends = !queue_open && batch.is_empty(); // every handle is gone
            let take = batch.len().min(WRITE_BATCH);
            for item in batch.drain(..take) {
                match item {
                    Outbound::App(m) if !self.secured => self.stage_app(&mut g, &m),
                    Outbound::App(m) => self.stage(&mut g, Message::App(m)),
                    Outbound::Frame(f) => {
                        ends = matches!(*f, Message::Goodbye(_) | Message::Reject(_));
                        self.stage(&mut g, *f);
                    }
                }
                if ends {
                    break; // nothing follows a farewell
                }
                if g.staged >= WRITE_CHUNK && !self.flush(&mut g).await? {
                    return Ok(Stop::Cancelled);
                }
            }
            if !self.flush(&mut g).await? {
                return Ok(Stop::Cancelled);
            }
            if ends {
                return Ok(Stop::Done);
            }
        }
    }

    /// Adds one frame to the group: encoded at once on a plaintext link,
    /// kept for one seal on a secured one.
    fn stage(&mut self, g: &mut Group, frame: Message) {
        let (apps, bytes) = match &frame {
            Message::App(m) => (1, m.payload.len() as u64),
            _ => (0, 0),
        };
        g.staged += bytes as usize + 64;
        if self.secured {
            g.frames.push(frame);
            g.held = (g.held.0 + 1, g.held.1 + apps, g.held.2 + bytes);
            return;
        }
        match self.encoder.encode(frame, &mut g.out) {
            Ok(()) => {
                g.n_frames += 1;
                g.n_apps += apps;
                g.app_bytes += bytes;
            }
            Err(error) => self.unencodable(1, &error),
        }
    }

    /// [`Writer::stage`] of an application message on a plaintext link:
    /// encoded straight from the queue's item, never moved into a
    /// [`Message`] (several times its size).
    fn stage_app(&mut self, g: &mut Group, m: &AppMessage) {
        let bytes = m.payload.len();
        g.staged += bytes + 64;
        match self.encoder.encode_app(m, &mut g.out) {
            Ok(()) => {
                g.n_frames += 1;
                g.n_apps += 1;
                g.app_bytes += bytes as u64;
            }
            Err(error) => self.unencodable(1, &error),
        }
    }

    /// Seals what is staged (secured links), writes it and counts it.
    /// False when the link's token fired during the write.
    async fn flush(&mut self, g: &mut Group) -> std::io::Result<bool> {
        if !g.frames.is_empty() {
            let frames = std::mem::take(&mut g.frames);
            let (n, apps, bytes) = std::mem::take(&mut g.held);
            // One batch, one seal (records close at 64 KiB of plaintext).
            // The codec writes all of it or nothing: a frame over the limit
            // costs its whole group (the control API refuses such payloads
            // before they reach a link).
            match self.encoder.encode(frames, &mut g.out) {
                Ok(()) => {
                    g.n_frames += n;
                    g.n_apps += apps;
                    g.app_bytes += bytes;
                }
                Err(error) => self.unencodable(n, &error),
            }
        }
        let wrote = if g.out.is_empty() {
            true
        } else {
            // `write_all` is not cancel-safe: it races only the token that
            // ends this task, never another arm of the loop.
            tokio::select! {
                biased;
                () = self.cancel.cancelled() => false,
                res = self.wr.write_all(&g.out) => {
                    res?;
                    true
                }
            }
        };
        if wrote {
            self.stats
                .frames_out
                .fetch_add(g.n_frames, Ordering::Relaxed);
            add(
                &self.counters.msgs_out,
                &self.counters.bytes_out,
                g.n_apps,
                g.app_bytes,
            );
        }
        if g.out.len() < QUIET_WRITE {
            g.small_writes = g.small_writes.saturating_add(1);
        } else {
            g.small_writes = 0;
        }
        g.out.clear();
        let quiet = g.small_writes >= QUIET_AFTER;
        if g.out.capacity() > KEEP_BUF || (quiet && g.out.capacity() > OUT_ROOM) {
            g.out = BytesMut::with_capacity(OUT_ROOM);
        }
        (g.staged, g.n_frames, g.n_apps, g.app_bytes) = (0, 0, 0, 0);
        Ok(wrote)
    }

    /// A frame this link cannot carry (larger than its maximum): dropped
    /// and counted, the link carries on.
    fn unencodable(&self, n: u64, error: &FrameError) {
        if self.stats.drops.record(now(), error.reason()) {
            warn!(peer = %self.peer.short(), %error, frames = n, "frames not sent (further drops of this kind are counted)");
        }
    }
}
