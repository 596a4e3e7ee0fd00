//! A session's queue of control messages for its heartbeat loop (a rotated token, a renewed
//! credential): bounded, and allocating no slot until a message is queued.
//!
//! Why not `tokio::sync::mpsc`: its channel allocates a whole block of 32 slots at creation,
//! whatever the bound, so every idle agent session on the hub held 32 × `size_of::<Control>()`
//! bytes (about 5 KiB) for messages that most sessions never get. Here the queue is a
//! `VecDeque` that grows on the first message and the shared part is about 150 bytes.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

use crate::proto::Control;

/// Why a message was not queued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OutboxError {
    /// The queue holds its bound of messages already.
    #[error("control outbox full")]
    Full,
    /// The heartbeat loop that reads the queue is gone.
    #[error("control outbox closed")]
    Closed,
}

/// A bounded control-message queue: the [`OutboxSender`] queues, the heartbeat loop's
/// [`OutboxReceiver`] writes each message to the peer.
pub fn channel(capacity: usize) -> (OutboxSender, OutboxReceiver) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            queue: VecDeque::new(),
            senders: 1,
            receiver_alive: true,
        }),
        capacity: capacity.max(1),
        to_receiver: Notify::new(),
        to_senders: Notify::new(),
    });
    (
        OutboxSender {
            shared: shared.clone(),
        },
        OutboxReceiver { shared },
    )
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    /// Messages the queue holds at most; a sender past it is told `Full` or waits.
    capacity: usize,
    /// Wakes the receiver: a message was queued or the last sender left.
    to_receiver: Notify,
    /// Wakes waiting senders: a slot was freed or the receiver left.
    to_senders: Notify,
}

#[derive(Debug)]
struct State {
    /// Empty until the first message: `VecDeque::new` allocates nothing.
    queue: VecDeque<Control>,
    /// Live senders; when none is left and the queue is empty, the receiver sees the end.
    senders: usize,
    receiver_alive: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves a plain queue behind; keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The queuing end of an outbox; clones share the queue.
#[derive(Debug)]
pub struct OutboxSender {
    shared: Arc<Shared>,
}

impl Clone for OutboxSender {
    fn clone(&self) -> Self {
        self.shared.lock().senders += 1;
        OutboxSender {
            shared: self.shared.clone(),
        }
    }
}

impl Drop for OutboxSender {
    fn drop(&mut self) {
        let last = {
            let mut state = self.shared.lock();
            state.senders -= 1;
            state.senders == 0
        };
        if last {
            // `notify_one` keeps a permit, so a receiver about to wait still sees the end.
            self.shared.to_receiver.notify_one();
        }
    }
}

impl OutboxSender {
    /// Queues `msg` without waiting: `Full` when the queue holds its bound, `Closed` when the
    /// heartbeat loop is gone.
    pub fn try_send(&self, msg: Control) -> Result<(), OutboxError> {
        self.push(&mut Some(msg))
    }

    /// Queues `msg`, waiting for a free slot; `Closed` when the heartbeat loop is gone.
    /// Cancel-safe: a cancelled call has queued nothing.
    pub async fn send(&self, msg: Control) -> Result<(), OutboxError> {
        let mut msg = Some(msg);
        loop {
            // Registered before the check, so a slot freed in between is not missed.
            let freed = self.shared.to_senders.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            match self.push(&mut msg) {
                Err(OutboxError::Full) => {}
                done => return done,
            }
            freed.await;
        }
    }

    /// Queues the message in `msg`, taking it out only when it was queued.
    fn push(&self, msg: &mut Option<Control>) -> Result<(), OutboxError> {
        {
            let mut state = self.shared.lock();
            if !state.receiver_alive {
                return Err(OutboxError::Closed);
            }
            if state.queue.len() >= self.shared.capacity {
                return Err(OutboxError::Full);
            }
            state.queue.extend(msg.take());
        }
        self.shared.to_receiver.notify_one();
        Ok(())
    }
}

/// The reading end of an outbox, held by the session's heartbeat loop.
#[derive(Debug)]
pub struct OutboxReceiver {
    shared: Arc<Shared>,
}

impl Drop for OutboxReceiver {
    fn drop(&mut self) {
        self.shared.lock().receiver_alive = false;
        self.shared.to_senders.notify_waiters();
    }
}

impl OutboxReceiver {
    /// The next queued message, waiting for one; `None` once every sender is gone and the
    /// queue is empty. Cancel-safe: a message leaves the queue only when this returns it.
    pub async fn recv(&mut self) -> Option<Control> {
        loop {
            {
                let mut state = self.shared.lock();
                if let Some(msg) = state.queue.pop_front() {
                    drop(state);
                    self.shared.to_senders.notify_waiters();
                    return Some(msg);
                }
                if state.senders == 0 {
                    return None;
                }
            }
            // A message queued since the check left a permit: this returns at once.
            self.shared.to_receiver.notified().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ping(seq: u64) -> Control {
        Control::Ping { seq }
    }

    fn seq(msg: Option<Control>) -> Option<u64> {
        match msg {
            Some(Control::Ping { seq }) => Some(seq),
            _ => None,
        }
    }

    #[test]
    fn an_idle_outbox_holds_no_slots() {
        // The reason this type exists: tokio's mpsc reserves 32 slots of `Control` at creation.
        let (tx, _rx) = channel(4);
        assert_eq!(tx.shared.lock().queue.capacity(), 0);
        assert!(
            std::mem::size_of::<Shared>() < 32 * std::mem::size_of::<Control>() / 4,
            "the shared part ({} bytes) must stay far below a block of 32 messages ({} bytes)",
            std::mem::size_of::<Shared>(),
            32 * std::mem::size_of::<Control>()
        );
    }

    #[tokio::test]
    async fn messages_arrive_in_order_and_the_bound_refuses_more() {
        let (tx, mut rx) = channel(2);
        assert_eq!(tx.try_send(ping(1)), Ok(()));
        assert_eq!(tx.try_send(ping(2)), Ok(()));
        assert_eq!(tx.try_send(ping(3)), Err(OutboxError::Full));
        assert_eq!(seq(rx.recv().await), Some(1));
        assert_eq!(tx.try_send(ping(4)), Ok(()));
        assert_eq!(seq(rx.recv().await), Some(2));
        assert_eq!(seq(rx.recv().await), Some(4));
    }

    #[tokio::test]
    async fn the_receiver_sees_the_end_after_the_last_sender_and_the_queue() {
        let (tx, mut rx) = channel(2);
        let second = tx.clone();
        tx.try_send(ping(1)).unwrap();
        drop(tx);
        drop(second);
        assert_eq!(seq(rx.recv().await), Some(1));
        let end = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await;
        assert!(matches!(end, Ok(None)), "{end:?}");
    }

    #[tokio::test]
    async fn a_waiting_receiver_wakes_for_a_message_and_a_sender_for_a_slot() {
        let (tx, mut rx) = channel(1);
        let reader = tokio::spawn(async move {
            let first = rx.recv().await;
            let second = rx.recv().await;
            (seq(first), seq(second))
        });
        tx.send(ping(1)).await.unwrap();
        // The bound is one: this waits until the reader took the first.
        tokio::time::timeout(Duration::from_secs(10), tx.send(ping(2)))
            .await
            .expect("a slot was freed")
            .unwrap();
        let got = tokio::time::timeout(Duration::from_secs(10), reader)
            .await
            .expect("reader finished")
            .unwrap();
        assert_eq!(got, (Some(1), Some(2)));
    }

    #[tokio::test]
    async fn a_closed_outbox_refuses_and_wakes_a_waiting_sender() {
        let (tx, rx) = channel(1);
        tx.try_send(ping(1)).unwrap();
        let waiting = tokio::spawn(async move { tx.send(ping(2)).await });
        tokio::task::yield_now().await;
        drop(rx);
        let got = tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("the waiting sender woke")
            .unwrap();
        assert_eq!(got, Err(OutboxError::Closed));
    }
}
