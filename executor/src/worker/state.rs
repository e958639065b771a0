//! Everything one worker holds: installed definitions, receivers, input blocks,
//! shuffle outputs and state partitions.
//!
//! [`WorkerState`] keeps each kind of data in its own map behind its own lock, so that
//! Flight reads never wait for a task. All data is immutable once stored (`Arc`s of
//! record batches); a new interval's state is a new version beside the old one until
//! the coordinator commits it.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use arrow_flight::FlightData;
use arrow_flight::utils::flight_data_to_batches;
use datafusion::catalog::{MemTable, TableProvider};
use datafusion::prelude::SessionContext;
use dstream_planner::{Catalog, SourceDef, StreamPlan};
use dstream_storage::{DataDir, IntervalId, S3Options, Timeline};
use tokio_util::sync::CancellationToken;

use super::checkpoint::{TakenPartition, Writing};
use super::compute::{ComputePool, Work};
use super::slots::TaskSlots;
use crate::block::{Block, with_interval_column};
use crate::connector::Split;
use crate::error::{Error, Result};
use crate::ingest::SourceRuntime;
use crate::operator::{ShufflePiece, StatePartition, StreamOperator, ViewUpdate};
use crate::task::session_config;
use crate::view_runtime::ViewPartition;

/// How many committed versions of a view partition's rows a worker keeps, so that an
/// ad-hoc query that took its snapshot a few intervals ago can still read it.
pub const VERSIONS_KEPT: u64 = 16;

/// How many checkpoints a worker remembers writing, for `AwaitCheckpoint`.
const CHECKPOINTS_KEPT: usize = 4;

/// A view as installed on a worker.
#[derive(Debug, Clone)]
pub struct InstalledView {
    pub plan: Arc<StreamPlan>,
    pub operator: Arc<dyn StreamOperator>,
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

/// One state partition of one view, on the worker that owns it.
#[derive(Debug, Default)]
pub struct PartitionSlot {
    pub state: Arc<StatePartition>,
    /// Committed view rows by interval, newest last; only intervals that changed them.
    pub versions: BTreeMap<IntervalId, ViewPartition>,
    /// Set once versions were dropped: reads before the kept ones cannot be served.
    pub expired: bool,
    /// The output of a reduce task, waiting for its interval's commit.
    pub pending: Option<(IntervalId, Arc<StatePartition>, ViewUpdate)>,
}

impl PartitionSlot {
    /// The view rows as of `interval`: the newest version at or before it.
    pub fn rows_as_of(&self, interval: IntervalId) -> Option<ViewPartition> {
        self.versions
            .range(..=interval)
            .next_back()
            .map(|(_, rows)| rows.clone())
    }

    pub fn current_rows(&self) -> ViewPartition {
        self.versions
            .values()
            .next_back()
            .cloned()
            .unwrap_or_default()
    }
}

/// The blocks of one source in one interval, by index.
pub type IntervalBlocks = BTreeMap<u32, HeldBlock>;

/// An input block as a worker holds it.
#[derive(Clone, Debug)]
pub enum HeldBlock {
    Decoded(Arc<Block>),
    /// A replica, kept as the Arrow IPC messages it arrived in (without its
    /// `_interval` column) and decoded the first time it is read: most replicas are
    /// only there in case their first copy is lost, and are never read.
    Encoded(Arc<EncodedBlock>),
    /// A replica of a replayable source's block, kept as how to seal its interval
    /// again: the rows are produced the first time one of the blocks is read.
    Lineage(Arc<LineageBlocks>),
}

/// The blocks one receiver of a replayable source sealed in one interval, as their
/// replica worker keeps them: what [`SourceRuntime::replay`] needs to produce them
/// again.
#[derive(Debug)]
pub struct LineageBlocks {
    def: Arc<SourceDef>,
    block_rows: usize,
    split: Split,
    interval: IntervalId,
    timeline: Timeline,
    watermark: Option<i64>,
    /// The seal done again, by the first read.
    replayed: OnceLock<std::result::Result<Vec<Arc<Block>>, String>>,
}

impl LineageBlocks {
    pub fn new(
        def: Arc<SourceDef>,
        block_rows: usize,
        split: Split,
        interval: IntervalId,
        timeline: Timeline,
        watermark: Option<i64>,
    ) -> Self {
        LineageBlocks {
            def,
            block_rows,
            split,
            interval,
            timeline,
            watermark,
            replayed: OnceLock::new(),
        }
    }

    /// The blocks, sealed again the first time they are asked for.
    fn blocks(&self, ctx: &SessionContext) -> Result<&[Arc<Block>]> {
        let replayed = self.replayed.get_or_init(|| {
            SourceRuntime::replay(
                self.def.clone(),
                ctx,
                self.block_rows,
                self.split,
                self.interval,
                &self.timeline,
                self.watermark,
            )
            .map_err(|e| e.to_string())
        });
        match replayed {
            Ok(blocks) => Ok(blocks),
            Err(e) => Err(Error::Internal(format!(
                "cannot seal interval {} of source {} again: {e}",
                self.interval, self.def.name
            ))),
        }
    }
}

/// A replica of an input block as it arrived over Flight.
#[derive(Debug)]
pub struct EncodedBlock {
    pub source: String,
    pub interval: IntervalId,
    pub index: usize,
    /// The source's full schema, `_interval` included.
    pub schema: SchemaRef,
    /// The start of the interval: the value of every row's `_interval`.
    pub interval_start: i64,
    /// Flight messages: the schema, then the record batches.
    pub messages: Vec<FlightData>,
}

impl EncodedBlock {
    fn decode(&self) -> Result<Block> {
        let batches = flight_data_to_batches(&self.messages)?
            .iter()
            .map(|b| with_interval_column(b, &self.schema, self.interval_start))
            .collect::<Result<Vec<_>>>()?;
        Ok(Block {
            source: self.source.clone(),
            interval: self.interval,
            index: self.index,
            schema: self.schema.clone(),
            batches,
            deletes: Vec::new(),
        })
    }
}

/// Key of a map task's output: (view, interval, block).
pub type ShuffleKey = (String, IntervalId, u32);

/// The state of one worker.
pub struct WorkerState {
    address: String,
    id: AtomicU64,
    running: AtomicU32,
    /// How many tasks compute at once; the earliest interval's go first.
    pub slots: Arc<TaskSlots>,
    /// Runs tasks; has no tables, only functions and settings.
    pub task_ctx: SessionContext,
    pub installed: tokio::sync::Mutex<Option<Installed>>,
    /// Receivers by (source, split).
    pub receivers: tokio::sync::Mutex<BTreeMap<(String, u32), SourceRuntime>>,
    blocks: Mutex<BTreeMap<(String, IntervalId), IntervalBlocks>>,
    shuffle: Mutex<HashMap<ShuffleKey, Arc<Vec<ShufflePiece>>>>,
    partitions: Mutex<HashMap<(String, u32), PartitionSlot>>,
    cancels: Mutex<HashMap<IntervalId, CancellationToken>>,
    /// Per-task tokens (children of their interval's), so that one task can be
    /// abandoned when a copy of it won elsewhere.
    task_cancels: Mutex<HashMap<(IntervalId, u64), CancellationToken>>,
    /// Fault injection: every task waits this long first (see `WorkerConfig`).
    task_delay: std::time::Duration,
    /// Fault injection: a task of this view aborts the process (see `WorkerConfig`).
    abort_view: Mutex<Option<String>>,
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
            running: AtomicU32::new(0),
            slots: TaskSlots::new(cores),
            task_ctx: SessionContext::new_with_config(session_config(1)),
            installed: tokio::sync::Mutex::new(None),
            receivers: tokio::sync::Mutex::new(BTreeMap::new()),
            blocks: Mutex::new(BTreeMap::new()),
            shuffle: Mutex::new(HashMap::new()),
            partitions: Mutex::new(HashMap::new()),
            cancels: Mutex::new(HashMap::new()),
            task_cancels: Mutex::new(HashMap::new()),
            task_delay,
            abort_view: Mutex::new(None),
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

    pub fn running_tasks(&self) -> u32 {
        self.running.load(Ordering::Relaxed)
    }

    /// How long each task waits before it runs (fault injection; zero normally).
    pub fn task_delay(&self) -> std::time::Duration {
        self.task_delay
    }

    /// Makes every task of `view` abort this process (fault injection).
    pub fn set_abort_view(&self, view: String) {
        *lock(&self.abort_view) = Some(view);
    }

    /// Whether a task of `view` is to abort this process (fault injection).
    pub fn aborts(&self, view: &str) -> bool {
        lock(&self.abort_view).as_deref() == Some(view)
    }

    /// Counts a task as running until the guard is dropped.
    pub fn task_started(self: &Arc<Self>) -> RunningTask {
        self.running.fetch_add(1, Ordering::Relaxed);
        RunningTask(self.clone())
    }

    /// Forgets everything: the coordinator no longer knows this worker, and will
    /// install what it needs again.
    pub async fn reset(&self) {
        *self.installed.lock().await = None;
        self.receivers.lock().await.clear();
        lock(&self.blocks).clear();
        lock(&self.shuffle).clear();
        lock(&self.partitions).clear();
    }

    // --- input blocks -------------------------------------------------------------

    pub fn put_block(&self, block: Arc<Block>) {
        lock(&self.blocks)
            .entry((block.source.clone(), block.interval))
            .or_default()
            .insert(block.index as u32, HeldBlock::Decoded(block));
    }

    /// Stores a replica as it arrived; [`WorkerState::block`] decodes it when read.
    pub fn put_encoded_block(&self, block: EncodedBlock) {
        lock(&self.blocks)
            .entry((block.source.clone(), block.interval))
            .or_default()
            .insert(block.index as u32, HeldBlock::Encoded(Arc::new(block)));
    }

    /// Keeps the lineage of blocks a peer sealed, in place of copies of them.
    pub fn put_lineage(&self, lineage: LineageBlocks, blocks: &[u32]) {
        let lineage = Arc::new(lineage);
        let mut held = lock(&self.blocks);
        let interval = held
            .entry((lineage.def.name.clone(), lineage.interval))
            .or_default();
        for index in blocks {
            interval.insert(*index, HeldBlock::Lineage(lineage.clone()));
        }
    }

    /// The block, if this worker holds it; a replica is decoded, or sealed again from
    /// its lineage, (once) here.
    pub fn block(
        &self,
        source: &str,
        interval: IntervalId,
        index: u32,
    ) -> Result<Option<Arc<Block>>> {
        let key = (source.to_string(), interval);
        let held = lock(&self.blocks)
            .get(&key)
            .and_then(|blocks| blocks.get(&index).cloned());
        let produced: Vec<Arc<Block>> = match held {
            None => return Ok(None),
            Some(HeldBlock::Decoded(block)) => return Ok(Some(block)),
            Some(HeldBlock::Encoded(encoded)) => vec![Arc::new(encoded.decode()?)],
            Some(HeldBlock::Lineage(lineage)) => lineage.blocks(&self.task_ctx)?.to_vec(),
        };
        let wanted = produced
            .iter()
            .find(|b| b.index as u32 == index)
            .cloned()
            .ok_or_else(|| {
                Error::Internal(format!(
                    "sealing interval {interval} of source {source} again did not give block {index}"
                ))
            })?;
        // Keep what was produced decoded, where the replica (not a newer copy) still is.
        if let Some(blocks) = lock(&self.blocks).get_mut(&key) {
            for block in produced {
                if let Some(slot) = blocks.get_mut(&(block.index as u32))
                    && !matches!(slot, HeldBlock::Decoded(_))
                {
                    *slot = HeldBlock::Decoded(block);
                }
            }
        }
        Ok(Some(wanted))
    }

    pub fn block_count(&self) -> u64 {
        lock(&self.blocks).values().map(|b| b.len() as u64).sum()
    }

    /// Drops blocks older than the retention allows after `interval`, except those
    /// from `lineage` on: recovery may replay them.
    pub fn expire_blocks(
        &self,
        interval: IntervalId,
        retain_intervals: u64,
        lineage: Option<IntervalId>,
    ) {
        let mut keep_from = interval
            .0
            .saturating_sub(retain_intervals.saturating_sub(1));
        if let Some(lineage) = lineage {
            keep_from = keep_from.min(lineage.0);
        }
        lock(&self.blocks).retain(|(_, i), _| i.0 >= keep_from);
    }

    // --- shuffle outputs ----------------------------------------------------------

    pub fn put_shuffle(&self, key: ShuffleKey, pieces: Vec<ShufflePiece>) {
        lock(&self.shuffle).insert(key, Arc::new(pieces));
    }

    pub fn shuffle(&self, key: &ShuffleKey) -> Option<Arc<Vec<ShufflePiece>>> {
        lock(&self.shuffle).get(key).cloned()
    }

    /// Drops the map outputs of `interval` and earlier.
    pub fn expire_shuffle(&self, interval: IntervalId) {
        lock(&self.shuffle).retain(|(_, i, _), _| *i > interval);
    }

    /// Drops the map outputs of `interval` alone.
    pub fn drop_shuffle(&self, interval: IntervalId) {
        lock(&self.shuffle).retain(|(_, i, _), _| *i != interval);
    }

    // --- state partitions ---------------------------------------------------------

    /// The committed state of a partition (empty if the partition is new here).
    pub fn partition_state(&self, view: &str, partition: u32) -> Arc<StatePartition> {
        lock(&self.partitions)
            .get(&(view.to_string(), partition))
            .map(|slot| slot.state.clone())
            .unwrap_or_default()
    }

    /// Stores a reduce task's output until its interval is committed, unless the task
    /// was abandoned (`cancel`): checked under the partitions' lock, which
    /// [`WorkerState::abandon`] also takes, so an abandoned task never leaves output.
    /// `adopted` is the partition a speculative copy fetched from its owner: it
    /// becomes this worker's here, with the output pending. Returns whether stored.
    pub fn set_pending(
        &self,
        key: (&str, u32),
        interval: IntervalId,
        output: (Arc<StatePartition>, ViewUpdate),
        adopted: Option<PartitionSlot>,
        cancel: &CancellationToken,
    ) -> bool {
        let mut partitions = lock(&self.partitions);
        if cancel.is_cancelled() {
            return false;
        }
        let (view, partition) = key;
        let slot = partitions.entry((view.to_string(), partition)).or_default();
        if let Some(adopted) = adopted {
            *slot = adopted;
        }
        slot.pending = Some((interval, output.0, output.1));
        true
    }

    /// Installs every pending output of `interval`; returns how many.
    pub fn commit(&self, interval: IntervalId) -> usize {
        let mut partitions = lock(&self.partitions);
        let mut committed: usize = 0;
        for slot in partitions.values_mut() {
            let Some((i, _, _)) = &slot.pending else {
                continue;
            };
            if *i != interval {
                continue;
            }
            let Some((_, state, update)) = slot.pending.take() else {
                continue;
            };
            slot.state = state;
            let rows: Option<ViewPartition> = match update {
                ViewUpdate::Replace(rows) => Some(Arc::new(rows)),
                ViewUpdate::Append(rows) if rows.is_empty() => None,
                ViewUpdate::Append(rows) => {
                    let mut all: Vec<RecordBatch> = slot.current_rows().as_ref().clone();
                    all.extend(rows);
                    Some(Arc::new(all))
                }
            };
            if let Some(rows) = rows {
                slot.versions.insert(interval, rows);
            }
            // Keep the newest version and those recent enough to be read.
            let oldest = interval.0.saturating_sub(VERSIONS_KEPT);
            while slot.versions.len() > 1 {
                match slot.versions.keys().next() {
                    Some(first) if first.0 < oldest => {
                        let first = *first;
                        slot.versions.remove(&first);
                        slot.expired = true;
                    }
                    _ => break,
                }
            }
            committed = committed.saturating_add(1);
        }
        committed
    }

    /// Drops the pending outputs of `interval`.
    pub fn discard(&self, interval: IntervalId) -> usize {
        let mut partitions = lock(&self.partitions);
        let mut dropped: usize = 0;
        for slot in partitions.values_mut() {
            if matches!(&slot.pending, Some((i, _, _)) if *i == interval) {
                slot.pending = None;
                dropped = dropped.saturating_add(1);
            }
        }
        dropped
    }

    /// A partition's rows as of `interval`: its view rows, unless that version is no
    /// longer kept or the partition is not here (it moved to another worker after
    /// the reader took its snapshot).
    pub fn view_rows(&self, view: &str, partition: u32, interval: IntervalId) -> ViewRowsRead {
        let partitions = lock(&self.partitions);
        match partitions.get(&(view.to_string(), partition)) {
            None => ViewRowsRead::NotHere,
            Some(slot) => match slot.rows_as_of(interval) {
                Some(rows) => ViewRowsRead::Rows(rows),
                None if slot.expired => ViewRowsRead::TooOld,
                None => ViewRowsRead::Rows(Arc::default()),
            },
        }
    }

    /// A partition's committed view rows.
    pub fn current_view_rows(&self, view: &str, partition: u32) -> ViewPartition {
        lock(&self.partitions)
            .get(&(view.to_string(), partition))
            .map(|slot| slot.current_rows())
            .unwrap_or_default()
    }

    /// Runs `f` on a partition's slot, if this worker holds the partition.
    pub fn with_partition<R>(
        &self,
        view: &str,
        partition: u32,
        f: impl FnOnce(&PartitionSlot) -> R,
    ) -> Option<R> {
        lock(&self.partitions)
            .get(&(view.to_string(), partition))
            .map(f)
    }

    /// Takes over a partition handed over by a leaving worker.
    pub fn adopt_partition(&self, view: &str, partition: u32, slot: PartitionSlot) {
        lock(&self.partitions).insert((view.to_string(), partition), slot);
    }

    /// Forgets a partition another worker took over.
    pub fn drop_partition(&self, view: &str, partition: u32) {
        lock(&self.partitions).remove(&(view.to_string(), partition));
    }

    pub fn partition_count(&self) -> u64 {
        lock(&self.partitions).len() as u64
    }

    /// Forgets everything held for `name` (a view or a source).
    pub fn forget(&self, name: &str) {
        lock(&self.partitions).retain(|(view, _), _| view != name);
        lock(&self.shuffle).retain(|(view, _, _), _| view != name);
        lock(&self.blocks).retain(|(source, _), _| source != name);
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

    /// Every partition held here, as last committed.
    pub fn committed_partitions(&self) -> Vec<TakenPartition> {
        lock(&self.partitions)
            .iter()
            .map(|((view, partition), slot)| TakenPartition {
                view: view.clone(),
                partition: *partition,
                state: slot.state.clone(),
                rows: slot.current_rows(),
            })
            .collect()
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

    // --- cancellation -------------------------------------------------------------

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

    /// Stops `tasks` of `interval` (their copies won elsewhere) and forgets the
    /// partitions in `drop`, pending output included. A stopped task stores nothing
    /// afterwards (see [`WorkerState::set_pending`]).
    pub fn abandon(&self, interval: IntervalId, tasks: &[u64], drop: &[(String, u32)]) {
        {
            let mut tokens = lock(&self.task_cancels);
            for task in tasks {
                tokens.entry((interval, *task)).or_default().cancel();
            }
        }
        let mut partitions = lock(&self.partitions);
        for key in drop {
            partitions.remove(key);
        }
    }

    pub fn finish_interval(&self, interval: IntervalId) {
        lock(&self.cancels).retain(|i, _| *i > interval);
        lock(&self.task_cancels).retain(|(i, _), _| *i > interval);
    }
}

/// A partition read for an ad-hoc query.
#[derive(Debug)]
pub enum ViewRowsRead {
    Rows(ViewPartition),
    /// The interval asked for is older than the versions this worker keeps.
    TooOld,
    /// This worker does not hold the partition (any more).
    NotHere,
}

/// Marks a task as running while it lives.
#[derive(Debug)]
pub struct RunningTask(Arc<WorkerState>);

impl Drop for RunningTask {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use arrow::array::Int64Array;
    use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
    use arrow_flight::utils::batches_to_flight_data;

    use super::*;

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
        state.put_encoded_block(EncodedBlock {
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
        let kept = state.task_token(t, 1);
        assert!(state.set_pending((view, 0), t, output(), None, &kept));
        state.abandon(t, &[2], &[]);
        let abandoned = state.task_token(t, 2);
        assert!(!state.set_pending((view, 1), t, output(), None, &abandoned));
        assert_eq!(state.commit(t), 1);
        assert!(matches!(state.view_rows(view, 0, t), ViewRowsRead::Rows(_)));
        assert!(matches!(state.view_rows(view, 1, t), ViewRowsRead::NotHere));
        // Abandoning a task whose copy won elsewhere drops its partition here.
        state.abandon(IntervalId(5), &[1], &[(view.to_string(), 0)]);
        assert!(matches!(state.view_rows(view, 0, t), ViewRowsRead::NotHere));
        // A later attempt of an interval (after a cancel) gets fresh tokens.
        state.cancel(t);
        assert!(!state.task_token(t, 2).is_cancelled());
    }
}
