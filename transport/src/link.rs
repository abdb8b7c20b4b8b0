//! One established link: a reader task and a writer task around the owned
//! halves of a TCP stream.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use proto::frame::{AppMessage, Goodbye, Ping};
use proto::{FrameCodec, Message, NodeId};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::mpsc;
use tokio::time::{timeout, Instant};
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::debug;

use crate::actor::{Internal, Shared, TransportEvent};

/// Most queued messages the writer flushes in one batch.
const WRITE_BATCH: usize = 64;

/// Per-link counters (application messages and their payload bytes).
#[derive(Debug, Default)]
pub struct LinkCounters {
    /// Application messages received.
    pub msgs_in: AtomicU64,
    /// Application messages sent.
    pub msgs_out: AtomicU64,
    /// Payload bytes received.
    pub bytes_in: AtomicU64,
    /// Payload bytes sent.
    pub bytes_out: AtomicU64,
    /// When a frame last arrived, in microseconds since the transport's
    /// epoch (0: none yet). Read by the actor's liveness report.
    pub heard_us: AtomicU64,
    /// Last round-trip time known on this link, in microseconds (0: none):
    /// measured by the dialer, learnt from its pings by the acceptor.
    pub rtt_us: AtomicU64,
}

/// Cheap, cloneable handle to one link's writer.
#[derive(Clone, Debug)]
pub struct LinkHandle {
    pub(crate) tx: mpsc::Sender<Message>,
    pub(crate) cancel: CancellationToken,
    /// Counters of this link.
    pub counters: Arc<LinkCounters>,
}

impl LinkHandle {
    /// Queues an application message, waiting up to `wait` for room. On
    /// timeout the link is closed (slow-peer policy) and `false` returned.
    pub async fn send_app(&self, msg: AppMessage, wait: Duration) -> Result<(), crate::SendError> {
        let len = msg.payload.len() as u64;
        // Fast path without a timer: there is room in the queue.
        let msg = match self.tx.try_send(Message::App(msg)) {
            Ok(()) => {
                self.count_out(len);
                return Ok(());
            }
            Err(mpsc::error::TrySendError::Closed(_)) => return Err(crate::SendError::Closed),
            Err(mpsc::error::TrySendError::Full(msg)) => msg,
        };
        match timeout(wait, self.tx.send(msg)).await {
            Ok(Ok(())) => {
                self.count_out(len);
                Ok(())
            }
            Ok(Err(_)) => Err(crate::SendError::Closed),
            Err(_) => {
                self.cancel.cancel(); // the peer does not drain: drop the link
                Err(crate::SendError::Stalled)
            }
        }
    }

    fn count_out(&self, len: u64) {
        self.counters.msgs_out.fetch_add(1, Ordering::Relaxed);
        self.counters.bytes_out.fetch_add(len, Ordering::Relaxed);
    }

    /// Queues a goodbye; the writer flushes it and closes the link.
    pub(crate) async fn goodbye(&self, reason: &str, wait: Duration) {
        let msg = Message::Goodbye(Goodbye {
            reason: reason.into(),
        });
        if timeout(wait, self.tx.send(msg)).await.is_err() {
            self.cancel.cancel(); // cannot say goodbye; just close
        }
    }

    /// Closes the link without a goodbye.
    pub fn close(&self) {
        self.cancel.cancel();
    }
}

/// Everything a link task needs to know about its link.
pub(crate) struct LinkSpec {
    pub peer: NodeId,
    pub conn: u64,
    pub reader: FramedRead<OwnedReadHalf, FrameCodec>,
    pub writer: FramedWrite<OwnedWriteHalf, FrameCodec>,
    /// This end dialed, so it pings; the other end only answers (one ping
    /// stream per link is enough to keep both ends informed).
    pub pings: bool,
}

/// Spawns the reader and writer of an established link.
pub(crate) fn spawn_link(
    spec: LinkSpec,
    shared: &Arc<Shared>,
    parent: &CancellationToken,
    tracker: &TaskTracker,
) -> LinkHandle {
    let LinkSpec {
        peer,
        conn,
        mut reader,
        mut writer,
        pings,
    } = spec;
    let (tx, mut rx) = mpsc::channel::<Message>(shared.cfg.queue);
    // A link failing cancels only itself; the transport cancels all links.
    let cancel = parent.child_token();
    let counters = Arc::new(LinkCounters::default());
    let started = Instant::now();

    let wc = cancel.clone();
    let wshared = shared.clone();
    let wcounters = counters.clone();
    let mut rounds = shared.ping_rounds.clone();
    tracker.spawn(async move {
        let _teardown = wc.clone().drop_guard(); // writer gone => reader goes too
                                                 // First ping at once, so the RTT is known as soon as the link is up;
                                                 // then one per ping round of the node (see `Shared::ping_rounds`).
        let (mut ping_now, mut pinging) = (pings, pings);
        let mut seq = 0u64;
        let mut batch = Vec::with_capacity(WRITE_BATCH);
        loop {
            let ping_due = ping_now
                || tokio::select! {
                    biased;
                    () = wc.cancelled() => break,
                    msg = rx.recv() => match msg {
                        Some(m) => {
                            batch.push(m);
                            false
                        }
                        None => break,
                    },
                    round = rounds.changed(), if pinging => {
                        // Err: the transport is shutting down; goodbyes follow.
                        pinging = round.is_ok();
                        pinging
                    }
                };
            ping_now = false;
            if ping_due {
                seq += 1;
                let ts_us = started.elapsed().as_micros() as u64;
                let rtt_us = wcounters.rtt_us.load(Ordering::Relaxed);
                batch.push(Message::Ping(Ping { seq, ts_us, rtt_us }));
            }
            if batch.is_empty() {
                continue;
            }
            // Batch what is already queued, then flush once. `feed`/`flush`
            // are not cancel-safe: they race only the token that ends us.
            let closing = batch
                .iter()
                .any(|m| matches!(m, Message::Goodbye(_) | Message::Reject(_)));
            if !closing {
                while batch.len() < WRITE_BATCH {
                    match rx.try_recv() {
                        Ok(m) => {
                            let stop = matches!(m, Message::Goodbye(_));
                            batch.push(m);
                            if stop {
                                break;
                            }
                        }
                        Err(_) => break,
                    }
                }
            }
            let ends = batch
                .iter()
                .any(|m| matches!(m, Message::Goodbye(_) | Message::Reject(_)));
            let n = batch.len() as u64;
            // One item for the whole batch: on a secured link one seal
            // covers it (see `FrameCodec`).
            let items = std::mem::replace(&mut batch, Vec::with_capacity(WRITE_BATCH));
            let write = async {
                writer.feed(items).await?;
                SinkExt::<Vec<Message>>::flush(&mut writer).await
            };
            let res = tokio::select! {
                biased;
                () = wc.cancelled() => break,
                res = write => res,
            };
            if let Err(error) = res {
                debug!(peer = %peer.short(), %error, "link write failed");
                break;
            }
            wshared.stats.frames_out.fetch_add(n, Ordering::Relaxed);
            if ends {
                break;
            }
        }
        // Best effort FIN; the peer may already be gone.
        let closed: Result<(), proto::FrameError> = match timeout(
            Duration::from_millis(200),
            SinkExt::<Message>::close(&mut writer),
        )
        .await
        {
            Ok(res) => res,
            Err(_) => Ok(()), // peer not reading; dropping the half closes it anyway
        };
        if let Err(error) = closed {
            debug!(peer = %peer.short(), %error, "link close failed");
        }
    });

    let rc = cancel.clone();
    let rshared = shared.clone();
    let rcounters = counters.clone();
    let pong_tx = tx.clone();
    let link_timeout = shared.cfg.link_timeout;
    tracker.spawn(async move {
        let _teardown = rc.clone().drop_guard();
        // One timer for the link's life, not one per frame: each frame only
        // notes the time; when the timer fires it moves to "last frame +
        // timeout" unless the link really was silent that long.
        let silence = tokio::time::sleep(link_timeout);
        tokio::pin!(silence);
        let mut last_frame = Instant::now();
        let (graceful, reason) = loop {
            let next = tokio::select! {
                () = rc.cancelled() => break (false, "closed".to_string()),
                () = &mut silence => {
                    let quiet_until = last_frame + link_timeout;
                    if Instant::now() >= quiet_until {
                        break (false, format!("silent for {link_timeout:?}"));
                    }
                    silence.as_mut().reset(quiet_until);
                    continue;
                }
                next = reader.next() => next, // cancel-safe
            };
            last_frame = Instant::now();
            let heard = last_frame
                .into_std()
                .saturating_duration_since(rshared.epoch)
                .as_micros() as u64;
            rcounters.heard_us.store(heard.max(1), Ordering::Relaxed);
            let frame = match next {
                None => break (false, "connection closed".to_string()),
                Some(Err(error)) => {
                    rshared
                        .stats
                        .drops
                        .record(std::time::Instant::now(), error.reason());
                    break (false, format!("bad frame: {error}"));
                }
                Some(Ok(frame)) => frame,
            };
            rshared.stats.frames_in.fetch_add(1, Ordering::Relaxed);
            let event = match frame {
                Message::Ping(p) => {
                    if p.rtt_us > 0 {
                        rcounters.rtt_us.store(p.rtt_us, Ordering::Relaxed);
                    }
                    // Full queue: the peer's ping goes unanswered, which is
                    // what an overloaded link should look like.
                    if pong_tx.try_send(Message::Pong(p)).is_err() {
                        debug!(peer = %peer.short(), "pong skipped: queue full");
                    }
                    continue;
                }
                Message::Pong(p) => {
                    // Liveness and RTT go through the counters, which the
                    // actor reports in batches: no event per pong.
                    let now = started.elapsed().as_micros() as u64;
                    let rtt = now.saturating_sub(p.ts_us).max(1);
                    rcounters.rtt_us.store(rtt, Ordering::Relaxed);
                    continue;
                }
                Message::App(msg) => {
                    rcounters.msgs_in.fetch_add(1, Ordering::Relaxed);
                    rcounters
                        .bytes_in
                        .fetch_add(msg.payload.len() as u64, Ordering::Relaxed);
                    TransportEvent::Message { id: peer, msg }
                }
                Message::Goodbye(g) => break (true, format!("goodbye: {}", g.reason)),
                Message::Reject(r) if r.code == "duplicate" => {
                    break (true, "duplicate link".into())
                }
                Message::Reject(r) => {
                    break (false, format!("rejected ({}): {}", r.code, r.detail))
                }
                Message::Peers(list) => TransportEvent::Peers { id: peer, list },
                Message::Hello(_) | Message::Welcome(_) => {
                    rshared
                        .stats
                        .drops
                        .record(std::time::Instant::now(), "handshake_after_handshake");
                    break (false, "handshake frame on an established link".into());
                }
            };
            // Backpressure: a node that cannot keep up slows its links' readers.
            if rshared.events.send(event).await.is_err() {
                break (false, "node stopping".into());
            }
        };
        let goodbye = reason.starts_with("goodbye");
        // Tell the actor; it decides whether this was the current link.
        let closed = Internal::Closed {
            id: peer,
            conn,
            graceful,
            goodbye,
            reason,
        };
        if rshared.internal.send(closed).await.is_err() {
            debug!(peer = %peer.short(), "transport gone before link close was reported");
        }
    });

    LinkHandle {
        tx,
        cancel,
        counters,
    }
}
