//! Task slots: how many tasks a worker computes at once (Spark's executor cores).
//!
//! A slot that frees goes to the waiting task of the earliest interval, and among
//! those of one interval to the one that asked first. The coordinator starts the
//! next interval's map tasks while the current one reduces (see the scheduler's map
//! ahead); ordering by interval keeps them from holding up the interval in progress.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::sync::{Arc, Mutex, MutexGuard};

use dstream_storage::IntervalId;
use tokio::sync::oneshot;

/// A worker's task slots.
#[derive(Debug)]
pub struct TaskSlots {
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Slots nobody holds. Never positive while a task waits.
    free: usize,
    waiting: BinaryHeap<Waiter>,
    /// Ask order, to serve one interval's tasks first come, first served.
    asked: u64,
}

#[derive(Debug)]
struct Waiter {
    interval: IntervalId,
    asked: u64,
    wake: oneshot::Sender<()>,
}

impl Waiter {
    fn key(&self) -> (IntervalId, u64) {
        (self.interval, self.asked)
    }
}

// The heap pops its greatest element: the earliest interval, then the first to ask.
impl Ord for Waiter {
    fn cmp(&self, other: &Self) -> Ordering {
        other.key().cmp(&self.key())
    }
}

impl PartialOrd for Waiter {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Waiter {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}

impl Eq for Waiter {}

/// A held slot; dropping it frees it.
#[derive(Debug)]
pub struct Slot {
    slots: Arc<TaskSlots>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.slots.release();
    }
}

/// A task waiting for a slot. Dropped after the slot was handed to it but before it
/// took it (its task was stopped meanwhile), it passes the slot on.
struct Waiting {
    wake: oneshot::Receiver<()>,
    slots: Arc<TaskSlots>,
    took: bool,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if !self.took {
            self.wake.close();
            if self.wake.try_recv().is_ok() {
                self.slots.release();
            }
        }
    }
}

impl TaskSlots {
    /// `slots` slots (at least one).
    pub fn new(slots: usize) -> Arc<Self> {
        Arc::new(TaskSlots {
            inner: Mutex::new(Inner {
                free: slots.max(1),
                waiting: BinaryHeap::new(),
                asked: 0,
            }),
        })
    }

    /// Waits for a slot for a task of `interval`.
    pub async fn acquire(self: &Arc<Self>, interval: IntervalId) -> Slot {
        let wake = {
            let mut inner = self.lock();
            if inner.free > 0 {
                inner.free = inner.free.saturating_sub(1);
                return Slot {
                    slots: self.clone(),
                };
            }
            let (wake, woken) = oneshot::channel();
            inner.asked = inner.asked.saturating_add(1);
            let asked = inner.asked;
            inner.waiting.push(Waiter {
                interval,
                asked,
                wake,
            });
            woken
        };
        let mut waiting = Waiting {
            wake,
            slots: self.clone(),
            took: false,
        };
        // The sender is dropped unsent only with the slots themselves.
        let _ = (&mut waiting.wake).await;
        waiting.took = true;
        Slot {
            slots: self.clone(),
        }
    }

    /// Hands a freed slot to the first waiting task that still waits, or keeps it.
    fn release(&self) {
        let mut inner = self.lock();
        while let Some(waiter) = inner.waiting.pop() {
            if waiter.wake.send(()).is_ok() {
                return;
            }
        }
        inner.free = inner.free.saturating_add(1);
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        match self.inner.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Whether `fut` is ready after the runtime had a chance to run it.
    async fn ready<F: std::future::Future + Unpin>(fut: &mut F) -> bool {
        tokio::time::timeout(Duration::from_millis(20), fut)
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn a_freed_slot_goes_to_the_earliest_interval_then_the_first_to_ask() {
        let slots = TaskSlots::new(1);
        let held = slots.acquire(IntervalId(5)).await;
        let mut later = Box::pin(slots.acquire(IntervalId(6)));
        let mut first = Box::pin(slots.acquire(IntervalId(5)));
        let mut second = Box::pin(slots.acquire(IntervalId(5)));
        assert!(!ready(&mut later).await);
        assert!(!ready(&mut first).await);
        assert!(!ready(&mut second).await);

        drop(held);
        let held = first.await;
        assert!(!ready(&mut later).await);
        assert!(!ready(&mut second).await);
        drop(held);
        let held = second.await;
        assert!(!ready(&mut later).await);
        drop(held);
        drop(later.await);
        // All free again.
        drop(slots.acquire(IntervalId(1)).await);
    }

    #[tokio::test]
    async fn a_task_stopped_while_waiting_passes_its_slot_on() {
        let slots = TaskSlots::new(1);
        let held = slots.acquire(IntervalId(1)).await;
        let mut stopped = Box::pin(slots.acquire(IntervalId(1)));
        let mut next = Box::pin(slots.acquire(IntervalId(2)));
        assert!(!ready(&mut stopped).await);
        // The slot is handed to `stopped`, which goes away before taking it.
        drop(held);
        drop(stopped);
        assert!(ready(&mut next).await);
    }

    #[tokio::test]
    async fn slots_up_to_the_count_are_held_at_once() {
        let slots = TaskSlots::new(2);
        let a = slots.acquire(IntervalId(1)).await;
        let _b = slots.acquire(IntervalId(1)).await;
        let mut c = Box::pin(slots.acquire(IntervalId(1)));
        assert!(!ready(&mut c).await);
        drop(a);
        assert!(ready(&mut c).await);
    }
}
