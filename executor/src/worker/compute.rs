//! The runtimes a worker computes on, at lower scheduling priorities than the one it
//! answers requests on.
//!
//! A worker answers its peers and the coordinator (Flight reads and puts, seal
//! requests, heartbeats) on its main runtime, runs tasks on a second one and seals its
//! receivers' input on a third, each at a lower priority than the one before:
//! - When a task keeps the core busy, a request from another worker gets the core as
//!   soon as it arrives instead of after the scheduler's time slice (milliseconds), so
//!   that a shuffle between two busy workers is not held up by the work on either side.
//! - Receivers sealing the next interval ahead (see the coordinator's scheduler) use
//!   what the current interval's tasks leave idle, instead of slowing them down.

use std::future::Future;

use tokio::runtime::Runtime;
use tokio_util::task::AbortOnDropHandle;

use crate::error::{Error, Result};

/// What a pool runs, and so its threads' name and nice value (the main runtime's
/// threads keep the process's).
#[derive(Clone, Copy, Debug)]
pub enum Work {
    Tasks,
    Receivers,
    /// The coordinator's statements: parsing, definitions, `SHOW`, `ADVANCE`, at the
    /// process's own priority.
    Statements,
    /// The coordinator's ad-hoc queries, at the process's own priority.
    Queries,
}

impl Work {
    fn thread_name(self) -> &'static str {
        match self {
            Work::Tasks => "dstream-task",
            Work::Receivers => "dstream-ingest",
            Work::Statements => "dstream-sql",
            Work::Queries => "dstream-query",
        }
    }

    fn nice(self) -> i32 {
        match self {
            Work::Tasks => 10,
            Work::Receivers => 19,
            Work::Statements | Work::Queries => 0,
        }
    }
}

/// A runtime whose threads run at `Work`'s priority, on stacks deep enough for any
/// statement within [`dstream_planner::limits::StatementLimits`]: tasks plan and
/// evaluate the view's expressions, and a stack overflow would abort the process.
pub struct ComputePool {
    runtime: Option<Runtime>,
}

impl ComputePool {
    pub fn new(work: Work, threads: usize) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads.max(1))
            .thread_name(work.thread_name())
            .thread_stack_size(dstream_planner::limits::STATEMENT_STACK_BYTES)
            .on_thread_start(move || lower_priority(work.nice()))
            .enable_all()
            .build()
            .map_err(|e| Error::Internal(format!("cannot start the task runtime: {e}")))?;
        Ok(Self {
            runtime: Some(runtime),
        })
    }

    /// Runs `work` on the pool. Dropping the returned future stops it.
    pub async fn run<F>(&self, work: F) -> Result<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        AbortOnDropHandle::new(self.runtime()?.spawn(work))
            .await
            .map_err(|e| Error::Internal(format!("task panicked: {e}")))
    }

    /// Runs `work` on the pool to its end, even if the caller stops waiting.
    pub async fn run_to_end<F>(&self, work: F) -> Result<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.runtime()?
            .spawn(work)
            .await
            .map_err(|e| Error::Internal(format!("panicked: {e}")))
    }

    fn runtime(&self) -> Result<&Runtime> {
        self.runtime
            .as_ref()
            .ok_or_else(|| Error::Internal("the task runtime has stopped".into()))
    }
}

impl Drop for ComputePool {
    fn drop(&mut self) {
        // The worker may be dropped from async code, where a runtime cannot block.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Adds `nice` to the calling thread's nice value (Linux keeps one per thread), up to
/// the lowest priority, 19.
fn lower_priority(nice: i32) {
    if nice == 0 {
        return;
    }
    let thread = rustix::thread::gettid();
    let current = rustix::process::getpriority_process(Some(thread)).unwrap_or(0);
    let lower = current.saturating_add(nice).min(19);
    if let Err(e) = rustix::process::setpriority_process(Some(thread), lower) {
        tracing::debug!(error = %e, "cannot lower the priority of a thread");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The name and nice value of the thread that runs this.
    fn this_thread() -> (Option<String>, i32) {
        let nice = rustix::process::getpriority_process(Some(rustix::thread::gettid()));
        (
            std::thread::current().name().map(str::to_string),
            nice.unwrap_or(i32::MIN),
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn work_runs_on_the_pools_threads_at_their_priority() -> Result<()> {
        let (_, ours) = this_thread();
        let tasks = ComputePool::new(Work::Tasks, 1)?;
        let ingest = ComputePool::new(Work::Receivers, 1)?;
        let (name, nice) = tasks.run(async { this_thread() }).await?;
        assert_eq!(name.as_deref(), Some("dstream-task"));
        assert_eq!(
            nice,
            (ours + 10).min(19),
            "tasks compute 10 below the caller"
        );
        let (name, nice) = ingest.run_to_end(async { this_thread() }).await?;
        assert_eq!(name.as_deref(), Some("dstream-ingest"));
        assert_eq!(nice, 19);
        // The calling thread keeps its priority.
        assert_eq!(this_thread().1, ours);
        Ok(())
    }

    #[tokio::test]
    async fn dropping_the_future_stops_the_work() -> Result<()> {
        let pool = ComputePool::new(Work::Tasks, 1)?;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let work = pool.run(async move {
            // Holds the sender until stopped.
            let _tx = tx;
            std::future::pending::<()>().await
        });
        // Started, then dropped before it ends.
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(50), work)
                .await
                .is_err()
        );
        // Its sender is gone: the work was stopped, not left running.
        assert!(rx.await.is_err());
        Ok(())
    }
}
