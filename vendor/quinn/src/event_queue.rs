//! The endpoint-to-connection event queue (changed from upstream quinn 0.11.12).
//!
//! Upstream uses `tokio::sync::mpsc::unbounded_channel` here. That channel reserves its first
//! block of 32 slots when it is created, about 12.5 KiB for this event type, so every idle
//! connection of a server holding thousands of them pays for slots it rarely uses. This queue
//! allocates nothing until an event is queued, and the connection driver gives its slots back
//! when idle (`release_idle`), so an idle connection holds only the shared header.
//!
//! Semantics are those of the unbounded channel as quinn uses it: one sender (kept by the
//! endpoint), one receiver (the connection driver); `send` fails once the receiver is gone,
//! and the receiver sees the end after the sender is dropped and the queue is empty.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

struct State<T> {
    queue: VecDeque<T>,
    waker: Option<Waker>,
    sender_gone: bool,
    receiver_gone: bool,
}

struct Shared<T> {
    state: Mutex<State<T>>,
}

impl<T> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // No code holding the lock can panic part-way through an update, so a poisoned lock
        // still holds a consistent queue.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Creates a queue whose memory is allocated only while events are waiting.
pub(crate) fn unbounded<T>() -> (Sender<T>, Receiver<T>) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            queue: VecDeque::new(),
            waker: None,
            sender_gone: false,
            receiver_gone: false,
        }),
    });
    (
        Sender {
            shared: shared.clone(),
        },
        Receiver { shared },
    )
}

pub(crate) struct Sender<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Sender<T> {
    /// Queues `value` and wakes the receiver; gives the value back if the receiver is gone.
    pub(crate) fn send(&self, value: T) -> Result<(), T> {
        let waker = {
            let mut state = self.shared.lock();
            if state.receiver_gone {
                return Err(value);
            }
            state.queue.push_back(value);
            state.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
        Ok(())
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        let waker = {
            let mut state = self.shared.lock();
            state.sender_gone = true;
            state.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

impl<T> std::fmt::Debug for Sender<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sender").finish_non_exhaustive()
    }
}

pub(crate) struct Receiver<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Receiver<T> {
    /// The next event; `Ready(None)` once the sender is gone and nothing is queued.
    pub(crate) fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<T>> {
        let mut state = self.shared.lock();
        if let Some(value) = state.queue.pop_front() {
            return Poll::Ready(Some(value));
        }
        if state.sender_gone {
            return Poll::Ready(None);
        }
        match &mut state.waker {
            Some(waker) if waker.will_wake(cx.waker()) => {}
            slot => *slot = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}

impl<T> Receiver<T> {
    /// Gives the queue's slots back to the allocator if it is empty (the connection driver
    /// calls this when a wake-up had nothing to send, see `State::release_idle_buffers`).
    pub(crate) fn release_idle(&mut self) {
        let mut state = self.shared.lock();
        if state.queue.is_empty() && state.queue.capacity() > 0 {
            state.queue = VecDeque::new();
        }
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        let queued = {
            let mut state = self.shared.lock();
            state.receiver_gone = true;
            state.waker = None;
            std::mem::take(&mut state.queue)
        };
        // Events are dropped outside the lock.
        drop(queued);
    }
}

impl<T> std::fmt::Debug for Receiver<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiver").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;

    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn context() -> (Arc<Count>, Waker) {
        let count = Arc::new(Count(AtomicUsize::new(0)));
        (count.clone(), Waker::from(count))
    }

    #[test]
    fn an_idle_queue_holds_no_slots_and_a_released_one_gives_them_back() {
        let (tx, mut rx) = unbounded::<[u8; 400]>();
        assert_eq!(rx.shared.lock().queue.capacity(), 0);
        for _ in 0..64 {
            tx.send([0; 400]).map_err(|_| ()).expect("receiver alive");
        }
        let (_, waker) = context();
        let mut cx = Context::from_waker(&waker);
        for _ in 0..63 {
            assert!(matches!(rx.poll_recv(&mut cx), Poll::Ready(Some(_))));
        }
        // Not empty yet: nothing is given back.
        rx.release_idle();
        assert!(rx.shared.lock().queue.capacity() >= 64);
        assert!(matches!(rx.poll_recv(&mut cx), Poll::Ready(Some(_))));
        assert!(rx.poll_recv(&mut cx).is_pending());
        rx.release_idle();
        assert_eq!(rx.shared.lock().queue.capacity(), 0);
    }

    #[test]
    fn events_arrive_in_order_and_a_send_wakes_the_receiver() {
        let (tx, mut rx) = unbounded();
        let (count, waker) = context();
        let mut cx = Context::from_waker(&waker);
        assert!(rx.poll_recv(&mut cx).is_pending());
        tx.send(1).expect("receiver alive");
        tx.send(2).expect("receiver alive");
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        assert_eq!(rx.poll_recv(&mut cx), Poll::Ready(Some(1)));
        assert_eq!(rx.poll_recv(&mut cx), Poll::Ready(Some(2)));
    }

    #[test]
    fn the_receiver_sees_the_end_after_the_queue_and_a_gone_receiver_refuses() {
        let (tx, mut rx) = unbounded();
        let (count, waker) = context();
        let mut cx = Context::from_waker(&waker);
        tx.send(7).expect("receiver alive");
        drop(tx);
        assert_eq!(rx.poll_recv(&mut cx), Poll::Ready(Some(7)));
        assert_eq!(rx.poll_recv(&mut cx), Poll::Ready(None));

        let (tx, mut rx) = unbounded::<u32>();
        assert!(rx.poll_recv(&mut cx).is_pending());
        drop(tx);
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        assert_eq!(rx.poll_recv(&mut cx), Poll::Ready(None));

        let (tx, rx) = unbounded();
        drop(rx);
        assert_eq!(tx.send(3), Err(3));
    }
}
