//! [`TaskControl`]: the tasks a worker runs — slots, how many run, their
//! cancellation by interval or one by one, and the fault injection tests use.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dstream_storage::IntervalId;
use tokio_util::sync::CancellationToken;

use super::lock;
use crate::worker::slots::TaskSlots;

/// The tasks of one worker; the only owner of their tokens.
#[derive(Debug)]
pub struct TaskControl {
    /// How many tasks compute at once; the earliest interval's go first.
    pub slots: Arc<TaskSlots>,
    running: Arc<AtomicU32>,
    cancels: Mutex<HashMap<IntervalId, CancellationToken>>,
    /// Per-task tokens (children of their interval's), so that one task can be
    /// abandoned when a copy of it won elsewhere.
    task_cancels: Mutex<HashMap<(IntervalId, u64), CancellationToken>>,
    /// Fault injection: every task waits this long first (see `WorkerConfig`).
    delay: Duration,
    /// Fault injection: a task of this view aborts the process (see `WorkerConfig`).
    abort_view: Mutex<Option<String>>,
}

impl TaskControl {
    /// `cores` slots; every task first waits `delay` (zero but for fault injection).
    pub fn new(cores: usize, delay: Duration) -> Self {
        TaskControl {
            slots: TaskSlots::new(cores),
            running: Arc::default(),
            cancels: Mutex::default(),
            task_cancels: Mutex::default(),
            delay,
            abort_view: Mutex::default(),
        }
    }

    /// How many tasks run now.
    pub fn running(&self) -> u32 {
        self.running.load(Ordering::Relaxed)
    }

    /// Counts a task as running until the guard is dropped.
    pub fn started(&self) -> RunningTask {
        self.running.fetch_add(1, Ordering::Relaxed);
        RunningTask(self.running.clone())
    }

    /// How long each task waits before it runs (fault injection; zero normally).
    pub fn delay(&self) -> Duration {
        self.delay
    }

    /// Makes every task of `view` abort this process (fault injection).
    pub fn set_abort_view(&self, view: String) {
        *lock(&self.abort_view) = Some(view);
    }

    /// Whether a task of `view` is to abort this process (fault injection).
    pub fn aborts(&self, view: &str) -> bool {
        lock(&self.abort_view).as_deref() == Some(view)
    }

    /// The token that cancels the tasks of `interval`.
    pub fn cancel_token(&self, interval: IntervalId) -> CancellationToken {
        lock(&self.cancels).entry(interval).or_default().clone()
    }

    /// The token that abandons task `task` of `interval` (cancelled with the
    /// interval too). A task abandoned before it arrived gets a cancelled one.
    pub fn task_token(&self, interval: IntervalId, task: u64) -> CancellationToken {
        let parent = self.cancel_token(interval);
        lock(&self.task_cancels)
            .entry((interval, task))
            .or_insert_with(|| parent.child_token())
            .clone()
    }

    /// Cancels the running tasks of `interval`. Its tokens are forgotten, so that
    /// tasks of a later attempt of the interval get fresh ones.
    pub fn cancel(&self, interval: IntervalId) {
        if let Some(token) = lock(&self.cancels).remove(&interval) {
            token.cancel();
        }
        lock(&self.task_cancels).retain(|(i, _), _| *i != interval);
    }

    /// Stops `tasks` of `interval`: their copies won elsewhere.
    pub fn abandon(&self, interval: IntervalId, tasks: &[u64]) {
        let mut tokens = lock(&self.task_cancels);
        for task in tasks {
            tokens.entry((interval, *task)).or_default().cancel();
        }
    }

    /// Forgets the tokens of `interval` and earlier: their tasks are done.
    pub fn finish_interval(&self, interval: IntervalId) {
        lock(&self.cancels).retain(|i, _| *i > interval);
        lock(&self.task_cancels).retain(|(i, _), _| *i > interval);
    }
}

/// Marks a task as running while it lives.
#[derive(Debug)]
pub struct RunningTask(Arc<AtomicU32>);

impl Drop for RunningTask {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
