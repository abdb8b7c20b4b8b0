//! A link's queue: bounded, many senders (the [`LinkHandle`]s), one
//! receiver (the writer).
//!
//! Semantically a bounded `tokio::sync::mpsc` channel: `try_send` refuses
//! when full, `send` waits for room, the receiver takes items in the order
//! they were queued and sees the end once every sender is gone, and senders
//! see the end once the receiver is gone. It exists because the link's
//! queue is the hottest channel of a node (one send per application
//! message): here a send is one uncontended lock and nothing else unless
//! the writer sleeps, where tokio's channel pays five atomic operations per
//! message (permit, slot, ready bit, and the receiver's waker twice). The
//! writer takes everything queued at once, by swapping buffers with the
//! queue under the lock: no item is moved.
//!
//! Wake-ups: each side says, under the lock, that it is about to sleep
//! (`writer_waits`, `senders_wait`), and the other side wakes it after
//! changing the state, outside the lock. A sleeper registers with its
//! [`Notify`] before it looks at the state, so no wake-up is lost.
//!
//! [`LinkHandle`]: super::LinkHandle

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

/// A queue emptied with room for more than this many items gives its room
/// back: a burst must not leave every link that saw one holding a full
/// queue's worth of memory while idle.
const KEEP_ROOM: usize = 256;

/// Why [`Tx::try_send`] gave the item back.
#[derive(Debug)]
pub(crate) enum TrySendError<T> {
    /// No room.
    Full(T),
    /// The receiver is gone.
    Closed(T),
}

struct Chan<T> {
    state: Mutex<State<T>>,
    /// Wakes the receiver.
    to_writer: Notify,
    /// Wakes senders waiting for room, and those waiting for the end.
    to_senders: Notify,
}

struct State<T> {
    items: VecDeque<T>,
    cap: usize,
    senders: usize,
    receiver_gone: bool,
    writer_waits: bool,
    senders_wait: bool,
}

impl<T> Chan<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // A panic while holding the lock leaves the state consistent: every
        // critical section is a few field updates that cannot panic midway.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A bounded queue of `cap` items (at least one).
pub(crate) fn channel<T>(cap: usize) -> (Tx<T>, Rx<T>) {
    let chan = Arc::new(Chan {
        state: Mutex::new(State {
            items: VecDeque::new(),
            cap: cap.max(1),
            senders: 1,
            receiver_gone: false,
            writer_waits: false,
            senders_wait: false,
        }),
        to_writer: Notify::new(),
        to_senders: Notify::new(),
    });
    (Tx(chan.clone()), Rx(chan))
}

/// A sender; cloning it adds a sender.
pub(crate) struct Tx<T>(Arc<Chan<T>>);

impl<T> std::fmt::Debug for Tx<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("queue::Tx")
    }
}

impl<T> Clone for Tx<T> {
    fn clone(&self) -> Self {
        self.0.lock().senders += 1;
        Tx(self.0.clone())
    }
}

impl<T> Drop for Tx<T> {
    fn drop(&mut self) {
        let wake = {
            let mut s = self.0.lock();
            s.senders -= 1;
            s.senders == 0 && std::mem::take(&mut s.writer_waits)
        };
        if wake {
            self.0.to_writer.notify_one();
        }
    }
}

impl<T> Tx<T> {
    /// Queues `item` if there is room.
    pub(crate) fn try_send(&self, item: T) -> Result<(), TrySendError<T>> {
        self.push(item, false)
    }

    fn push(&self, item: T, will_wait: bool) -> Result<(), TrySendError<T>> {
        let wake = {
            let mut s = self.0.lock();
            if s.receiver_gone {
                return Err(TrySendError::Closed(item));
            }
            if s.items.len() >= s.cap {
                s.senders_wait |= will_wait;
                return Err(TrySendError::Full(item));
            }
            s.items.push_back(item);
            std::mem::take(&mut s.writer_waits)
        };
        if wake {
            self.0.to_writer.notify_one();
        }
        Ok(())
    }

    /// Queues `item`, waiting for room; gives it back if the receiver is
    /// gone. Cancel-safe in that dropping the future never queues it.
    pub(crate) async fn send(&self, mut item: T) -> Result<(), T> {
        loop {
            let room = self.0.to_senders.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            match self.push(item, true) {
                Ok(()) => return Ok(()),
                Err(TrySendError::Closed(i)) => return Err(i),
                Err(TrySendError::Full(i)) => item = i,
            }
            room.await;
        }
    }

    /// Resolves once the receiver is gone.
    pub(crate) async fn closed(&self) {
        loop {
            let end = self.0.to_senders.notified();
            tokio::pin!(end);
            end.as_mut().enable();
            if self.0.lock().receiver_gone {
                return;
            }
            end.await;
        }
    }
}

/// The receiver; dropping it closes the queue and drops what is queued.
pub(crate) struct Rx<T>(Arc<Chan<T>>);

impl<T> Drop for Rx<T> {
    fn drop(&mut self) {
        let items = {
            let mut s = self.0.lock();
            s.receiver_gone = true;
            std::mem::take(&mut s.items)
        };
        drop(items); // outside the lock
        self.0.to_senders.notify_waiters();
    }
}

impl<T> Rx<T> {
    /// Takes every queued item into `out`, which must be empty, without
    /// waiting: `Some(n)` with `n > 0` items, `Some(0)` when the queue is
    /// empty and every sender gone, `None` when it is just empty.
    pub(crate) fn try_recv_all(&mut self, out: &mut VecDeque<T>) -> Option<usize> {
        self.take(out, false)
    }

    /// The whole queue changes hands: `out` (empty) and the queue's
    /// buffer are swapped under the lock, so that taking costs the same for
    /// one item or a thousand, and no item is moved.
    fn take(&self, out: &mut VecDeque<T>, will_wait: bool) -> Option<usize> {
        debug_assert!(out.is_empty(), "the receiver takes into an empty buffer");
        let (n, wake, room) = {
            let mut s = self.0.lock();
            if s.items.is_empty() {
                if s.senders == 0 {
                    return Some(0);
                }
                s.writer_waits |= will_wait;
                // Idle: the room a burst left is given back.
                let room = (s.items.capacity() > KEEP_ROOM).then(|| std::mem::take(&mut s.items));
                drop(s);
                drop(room); // outside the lock
                return None;
            }
            std::mem::swap(&mut s.items, out);
            // The buffer handed to the queue keeps its room unless a burst
            // grew it and it would now sit idle in the queue.
            let room = (s.items.capacity() > KEEP_ROOM && out.len() <= KEEP_ROOM)
                .then(|| std::mem::take(&mut s.items));
            (out.len(), std::mem::take(&mut s.senders_wait), room)
        };
        drop(room); // outside the lock
        if wake {
            self.0.to_senders.notify_waiters();
        }
        Some(n)
    }

    /// Takes every queued item into `out` (empty), waiting while the queue
    /// is empty; 0 once it is empty and every sender gone. Cancel-safe:
    /// items leave the queue only in the poll that returns them.
    pub(crate) async fn recv_all(&mut self, out: &mut VecDeque<T>) -> usize {
        loop {
            let more = self.0.to_writer.notified();
            tokio::pin!(more);
            more.as_mut().enable();
            if let Some(n) = self.take(out, true) {
                return n;
            }
            more.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn bounded_ordered_and_closed_from_either_side() {
        let (tx, mut rx) = channel::<u32>(2);
        tx.try_send(1).unwrap();
        tx.try_send(2).unwrap();
        assert!(matches!(tx.try_send(3), Err(TrySendError::Full(3))));
        // A waiting send completes once the receiver makes room.
        let tx2 = tx.clone();
        let waiting = tokio::spawn(async move { tx2.send(3).await });
        let mut got = Vec::new();
        let mut out = VecDeque::new();
        assert_eq!(rx.recv_all(&mut out).await, 2);
        got.extend(out.drain(..));
        assert_eq!(
            tokio::time::timeout(Duration::from_secs(10), waiting)
                .await
                .unwrap()
                .unwrap(),
            Ok(())
        );
        assert_eq!(rx.recv_all(&mut out).await, 1);
        got.extend(out.drain(..));
        assert_eq!(got, [1, 2, 3]);
        assert_eq!(rx.try_recv_all(&mut out), None);
        // Every sender gone: the receiver sees the end after the last item.
        tx.try_send(4).unwrap();
        drop(tx);
        assert_eq!(rx.recv_all(&mut out).await, 1);
        out.clear();
        assert_eq!(rx.recv_all(&mut out).await, 0);

        // Receiver gone: senders see it, waiting or not.
        let (tx, rx) = channel::<u32>(1);
        tx.try_send(1).unwrap();
        let tx2 = tx.clone();
        let waiting = tokio::spawn(async move { tx2.send(2).await });
        tokio::task::yield_now().await;
        drop(rx);
        assert_eq!(waiting.await.unwrap(), Err(2));
        assert!(matches!(tx.try_send(5), Err(TrySendError::Closed(5))));
        tokio::time::timeout(Duration::from_secs(10), tx.closed())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_sleeping_receiver_wakes_for_each_burst() {
        let (tx, mut rx) = channel::<u32>(64);
        let producer = tokio::spawn(async move {
            for i in 0..10_000 {
                tx.send(i).await.unwrap();
                if i % 100 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        });
        let (mut got, mut out) = (Vec::new(), VecDeque::new());
        while rx.recv_all(&mut out).await > 0 {
            got.extend(out.drain(..));
        }
        producer.await.unwrap();
        assert!(got.iter().copied().eq(0..10_000), "all, in order");
    }

    #[test]
    fn an_emptied_queue_gives_back_the_room_of_a_burst() {
        let (tx, mut rx) = channel::<u32>(1024);
        for i in 0..1000 {
            tx.try_send(i).unwrap();
        }
        // The writer takes the burst whole; the queue keeps the writer's
        // empty buffer.
        let mut out = VecDeque::new();
        assert_eq!(rx.try_recv_all(&mut out), Some(1000));
        assert_eq!(rx.0.lock().items.capacity(), 0);
        // At the next take the writer hands back the burst's buffer: with
        // little queued, the queue does not keep it.
        out.clear();
        tx.try_send(1).unwrap();
        assert_eq!(rx.try_recv_all(&mut out), Some(1));
        assert!(rx.0.lock().items.capacity() <= KEEP_ROOM);
        // A queue found empty gives back whatever room it holds.
        let mut grown = VecDeque::with_capacity(2000);
        std::mem::swap(&mut rx.0.lock().items, &mut grown);
        assert_eq!(rx.try_recv_all(&mut VecDeque::new()), None);
        assert_eq!(rx.0.lock().items.capacity(), 0, "idle: no room kept");
    }
}
