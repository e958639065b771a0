//! Everything one worker holds, split by concern, each part the one owner of its data:
//!
//! - [`blocks`]: [`InputBlocks`], input blocks sealed here, replicas and lineage of
//!   peers' blocks, and the changes a stage keeps for its readers;
//! - [`shuffle`]: [`ShufflePieces`], map outputs until their interval is over;
//! - [`partitions`]: [`StatePartitions`], state partitions with their view-row
//!   versions and the output pending until its interval commits;
//! - [`tasks`]: [`TaskControl`], task slots, running tasks and their cancellation.
//!
//! [`WorkerState`] holds one of each beside the installed definitions, the
//! receivers, the compute pools and where checkpoints go. Each part keeps its data
//! behind its own lock, so that Flight reads never wait for a task. All data is
//! immutable once stored (`Arc`s of record batches); a new interval's state is a new
//! version beside the old one until the coordinator commits it.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use datafusion::catalog::{MemTable, TableProvider};
use datafusion::prelude::SessionContext;
use dstream_planner::{Catalog, StreamPlan};
use dstream_storage::{DataDir, IntervalId, S3Options, Timeline};

use super::checkpoint::Writing;
use super::compute::{ComputePool, Work};
use crate::block::Block;
use crate::error::Result;
use crate::operator::StageOperators;
use crate::task::session_config;

pub mod blocks;
pub mod partitions;
pub mod shuffle;
pub mod tasks;

pub use blocks::{EncodedBlock, HeldBlock, InputBlocks, LineageBlocks};
pub use partitions::{PartitionSlot, StatePartitions, VERSIONS_KEPT, ViewRowsRead};
pub use shuffle::{ShuffleKey, ShufflePieces};
pub use tasks::{RunningTask, TaskControl};

/// How many checkpoints a worker remembers writing, for `AwaitCheckpoint`.
const CHECKPOINTS_KEPT: usize = 4;

/// A view as installed on a worker.
#[derive(Debug, Clone)]
pub struct InstalledView {
    pub plan: Arc<StreamPlan>,
    pub operators: StageOperators,
}

/// The definitions a worker knows, and the settings they were planned with.
#[derive(Debug)]
pub struct Installed {
    pub timeline: Timeline,
    pub partitions: usize,
    pub block_rows: usize,
    pub retain_intervals: u64,
    pub catalog: Catalog,
    /// Table contents: memory tables get their rows pushed by the coordinator.
    pub tables: HashMap<String, Arc<dyn TableProvider>>,
    pub memory_tables: HashMap<String, Arc<MemTable>>,
    pub views: HashMap<String, InstalledView>,
}

/// The state of one worker.
pub struct WorkerState {
    address: String,
    id: AtomicU64,
    /// Runs tasks; has no tables, only functions and settings.
    pub task_ctx: SessionContext,
    pub installed: tokio::sync::Mutex<Option<Installed>>,
    /// Receivers by (source, split).
    pub receivers: tokio::sync::Mutex<BTreeMap<(String, u32), crate::ingest::SourceRuntime>>,
    pub blocks: InputBlocks,
    pub shuffle: ShufflePieces,
    pub partitions: StatePartitions,
    pub tasks: TaskControl,
    /// Where tasks compute, one thread per slot; started with the first task.
    compute: tokio::sync::OnceCell<ComputePool>,
    /// Where receivers seal their input, as many threads; started with the first seal.
    ingest: tokio::sync::OnceCell<ComputePool>,
    cores: usize,
    /// Where checkpoints go, once the coordinator said.
    store: Mutex<Option<DataDir>>,
    /// Credentials for the store that did not come from the environment.
    credentials: Mutex<S3Options>,
    /// Checkpoints started here, by interval (the few most recent).
    checkpoints: Mutex<BTreeMap<IntervalId, Writing>>,
}

impl std::fmt::Debug for WorkerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerState")
            .field("address", &self.address)
            .field("id", &self.id())
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

impl WorkerState {
    pub fn new(address: String, cores: usize) -> Self {
        Self::with_task_delay(address, cores, std::time::Duration::ZERO)
    }

    /// A worker whose every task first waits `task_delay`: a straggler, for testing
    /// speculation.
    pub fn with_task_delay(address: String, cores: usize, task_delay: std::time::Duration) -> Self {
        WorkerState {
            address,
            id: AtomicU64::new(0),
            task_ctx: SessionContext::new_with_config(session_config(1)),
            installed: tokio::sync::Mutex::new(None),
            receivers: tokio::sync::Mutex::new(BTreeMap::new()),
            blocks: InputBlocks::default(),
            shuffle: ShufflePieces::default(),
            partitions: StatePartitions::default(),
            tasks: TaskControl::new(cores, task_delay),
            compute: tokio::sync::OnceCell::new(),
            ingest: tokio::sync::OnceCell::new(),
            cores: cores.max(1),
            store: Mutex::new(None),
            credentials: Mutex::new(S3Options::default()),
            checkpoints: Mutex::new(BTreeMap::new()),
        }
    }

    /// The runtime tasks compute on.
    pub async fn compute(&self) -> Result<&ComputePool> {
        self.compute
            .get_or_try_init(|| async { ComputePool::new(Work::Tasks, self.cores) })
            .await
    }

    /// The runtime receivers seal on.
    pub async fn ingest(&self) -> Result<&ComputePool> {
        self.ingest
            .get_or_try_init(|| async { ComputePool::new(Work::Receivers, self.cores) })
            .await
    }

    /// Where other processes reach this worker.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The id the coordinator gave this worker (0 before registration).
    pub fn id(&self) -> u64 {
        self.id.load(Ordering::Relaxed)
    }

    pub fn set_id(&self, id: u64) {
        self.id.store(id, Ordering::Relaxed);
    }

    /// The block, if this worker holds it; a replica is decoded, or sealed again from
    /// its lineage (on the task context), once.
    pub fn block(
        &self,
        source: &str,
        interval: IntervalId,
        index: u32,
    ) -> Result<Option<Arc<Block>>> {
        self.blocks.get(source, interval, index, &self.task_ctx)
    }

    /// Forgets everything: the coordinator no longer knows this worker, and will
    /// install what it needs again.
    pub async fn reset(&self) {
        *self.installed.lock().await = None;
        self.receivers.lock().await.clear();
        self.blocks.clear();
        self.shuffle.clear();
        self.partitions.clear();
    }

    /// Forgets everything held for `name` (a view stage or a source).
    pub fn forget(&self, name: &str) {
        self.partitions.forget(name);
        self.shuffle.forget(name);
        self.blocks.forget(name);
    }

    /// Stops `tasks` of `interval` (their copies won elsewhere) and forgets the
    /// partitions in `drop`, pending output included. The tasks are stopped first:
    /// a stopped task stores nothing afterwards (see [`StatePartitions::set_pending`]).
    pub fn abandon(&self, interval: IntervalId, tasks: &[u64], drop: &[(String, u32)]) {
        self.tasks.abandon(interval, tasks);
        self.partitions.remove_all(drop);
    }

    // --- checkpoints --------------------------------------------------------------

    pub fn set_credentials(&self, credentials: S3Options) {
        *lock(&self.credentials) = credentials;
    }

    pub fn credentials(&self) -> S3Options {
        lock(&self.credentials).clone()
    }

    pub fn set_store(&self, store: DataDir) {
        *lock(&self.store) = Some(store);
    }

    pub fn store(&self) -> Option<DataDir> {
        lock(&self.store).clone()
    }

    /// Records a checkpoint being written; forgets all but the most recent few.
    pub fn add_checkpoint(&self, interval: IntervalId, writing: Writing) {
        let mut checkpoints = lock(&self.checkpoints);
        checkpoints.insert(interval, writing);
        while checkpoints.len() > CHECKPOINTS_KEPT {
            checkpoints.pop_first();
        }
    }

    pub fn checkpoint(&self, interval: IntervalId) -> Option<Writing> {
        lock(&self.checkpoints).get(&interval).cloned()
    }
}

#[cfg(test)]
mod tests {
    use arrow::array::Int64Array;
    use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
    use arrow_flight::utils::batches_to_flight_data;

    use arrow::array::RecordBatch;

    use super::*;
    use crate::block::with_interval_column;
    use crate::operator::{StatePartition, ViewUpdate};

    #[test]
    fn a_replica_kept_encoded_reads_back_as_the_block_it_copies() -> Result<()> {
        let records = Schema::new(vec![Field::new("k", DataType::Int64, true)]);
        let mut fields = records.fields().to_vec();
        fields.push(Arc::new(Field::new(
            "_interval",
            DataType::Timestamp(TimeUnit::Nanosecond, None),
            false,
        )));
        let schema = Arc::new(Schema::new(fields));
        let sent = vec![
            RecordBatch::try_new(
                Arc::new(records.clone()),
                vec![Arc::new(Int64Array::from_iter_values(0..1000))],
            )?,
            RecordBatch::try_new(
                Arc::new(records.clone()),
                vec![Arc::new(Int64Array::from(vec![Some(7), None]))],
            )?,
        ];
        let state = WorkerState::new("http://127.0.0.1:1".into(), 1);
        state.blocks.put_encoded(EncodedBlock {
            source: "s".into(),
            interval: IntervalId(3),
            index: 2,
            schema: schema.clone(),
            interval_start: 3_000,
            messages: batches_to_flight_data(&records, sent.clone())?,
        });
        let expected = sent
            .iter()
            .map(|b| with_interval_column(b, &schema, 3_000))
            .collect::<Result<Vec<_>>>()?;
        for _ in 0..2 {
            // Decoded on the first read, then held decoded.
            let block = state.block("s", IntervalId(3), 2)?;
            assert_eq!(block.map(|b| b.batches.clone()), Some(expected.clone()));
        }
        assert!(state.block("s", IntervalId(3), 0)?.is_none());
        Ok(())
    }

    #[test]
    fn an_abandoned_task_leaves_nothing_and_a_dropped_partition_is_not_here() {
        let state = WorkerState::new("http://127.0.0.1:1".into(), 1);
        let (t, view) = (IntervalId(4), "v");
        let output = || {
            (
                Arc::new(StatePartition::default()),
                ViewUpdate::Replace(vec![]),
            )
        };
        // Task 1 stores its output; task 2 is abandoned before it finishes (even
        // before it arrived), so its output is refused.
        let kept = state.tasks.task_token(t, 1);
        assert!(
            state
                .partitions
                .set_pending((view, 0), t, output(), None, &kept)
        );
        state.abandon(t, &[2], &[]);
        let abandoned = state.tasks.task_token(t, 2);
        assert!(
            !state
                .partitions
                .set_pending((view, 1), t, output(), None, &abandoned)
        );
        assert_eq!(state.partitions.commit(t), 1);
        assert!(matches!(
            state.partitions.view_rows(view, 0, t),
            ViewRowsRead::Rows(_)
        ));
        assert!(matches!(
            state.partitions.view_rows(view, 1, t),
            ViewRowsRead::NotHere
        ));
        // Abandoning a task whose copy won elsewhere drops its partition here.
        state.abandon(IntervalId(5), &[1], &[(view.to_string(), 0)]);
        assert!(matches!(
            state.partitions.view_rows(view, 0, t),
            ViewRowsRead::NotHere
        ));
        // A later attempt of an interval (after a cancel) gets fresh tokens.
        state.tasks.cancel(t);
        assert!(!state.tasks.task_token(t, 2).is_cancelled());
    }
}
