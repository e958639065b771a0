//! A worker's part of a checkpoint: writing the state partitions it owns.
//!
//! The coordinator asks for a checkpoint in the `Commit` of an interval. The worker
//! then takes the partitions as that commit left them — immutable `Arc`s, so taking
//! them costs nothing and later intervals do not change them — and writes them to the
//! object store while the next intervals run. `AwaitCheckpoint` drives the writing and
//! answers with the files written; the coordinator commits the checkpoint with a
//! manifest once every worker has answered (see `dstream_storage::checkpoint` for the
//! format).
//!
//! Recovery goes the other way: [`restore`] loads a lost partition from the latest
//! checkpoint onto a surviving worker, which then replays the input since.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use dstream_storage::checkpoint::{self, VIEW_ROWS};
use dstream_storage::{DataDir, IntervalId};
use futures::future::{BoxFuture, FutureExt, Shared};
use futures::{StreamExt, TryStreamExt};
use tracing::{debug, info};

use super::state::{PartitionSlot, WorkerState};
use crate::error::{Error, Result};
use crate::operator::StatePartition;
use crate::rpc::proto;
use crate::view_runtime::ViewPartition;

/// Partitions written at once by one worker.
const CONCURRENT_WRITES: usize = 4;

/// A checkpoint being written: shared by every `AwaitCheckpoint` for its interval.
pub type Writing =
    Shared<BoxFuture<'static, std::result::Result<Vec<proto::PartitionCheckpoint>, String>>>;

/// One committed partition, as a checkpoint takes it.
#[derive(Debug, Clone)]
pub struct TakenPartition {
    pub view: String,
    pub partition: u32,
    pub state: Arc<StatePartition>,
    pub rows: ViewPartition,
}

/// Takes the committed partitions held here for the checkpoint of `interval` and
/// prepares their writing to `store`.
pub async fn start(state: &WorkerState, store: DataDir, interval: IntervalId) {
    let taken = state.partitions.committed();
    let count = taken.len();
    let sql: HashMap<String, String> = match state.installed.lock().await.as_ref() {
        Some(installed) => taken
            .iter()
            .filter_map(|p| {
                let object = installed.catalog.get(&p.view)?;
                Some((p.view.clone(), object.sql().to_string()))
            })
            .collect(),
        None => HashMap::new(),
    };
    let writing = async move {
        let started = std::time::Instant::now();
        let written: Vec<proto::PartitionCheckpoint> = futures::stream::iter(taken)
            .map(|p| {
                let sql = sql.get(&p.view).cloned();
                write_partition(&store, interval, p, sql)
            })
            .buffer_unordered(CONCURRENT_WRITES)
            .try_collect()
            .await
            .map_err(|e| e.to_string())?;
        let bytes: u64 = written
            .iter()
            .flat_map(|p| p.files.iter())
            .map(|f| f.bytes)
            .sum();
        info!(%interval, partitions = written.len(), bytes, elapsed = ?started.elapsed(), "wrote checkpoint partitions");
        Ok(written)
    }
    .boxed()
    .shared();
    debug!(%interval, partitions = count, "checkpoint taken");
    state.add_checkpoint(interval, writing);
}

/// Writes one partition's files, then its record (with the view's `sql`; see
/// [`checkpoint::WrittenPartition`]).
async fn write_partition(
    store: &DataDir,
    interval: IntervalId,
    taken: TakenPartition,
    sql: Option<String>,
) -> Result<proto::PartitionCheckpoint> {
    let TakenPartition {
        view,
        partition,
        state,
        rows,
    } = taken;
    let parts = state
        .tables
        .iter()
        .map(|(table, batches)| (table.as_str(), batches.as_slice()))
        .chain([(VIEW_ROWS, rows.as_slice())]);
    let mut files = Vec::new();
    for (part, batches) in parts {
        let written =
            checkpoint::write_part(store, interval, &view, partition, part, batches).await?;
        files.extend(written);
    }
    let written = checkpoint::PartitionCheckpoint {
        partition,
        files,
        emitted_until: state.emitted_until,
        watermark: state.watermark,
        view_rows: rows.iter().map(|b| b.num_rows() as u64).sum(),
    };
    if let Some(sql) = sql {
        let record = checkpoint::WrittenPartition {
            sql,
            partition: written,
        };
        record.write(store, interval, &view).await?;
        return Ok(partition_proto(view, record.partition));
    }
    Ok(partition_proto(view, written))
}

fn partition_proto(view: String, p: checkpoint::PartitionCheckpoint) -> proto::PartitionCheckpoint {
    proto::PartitionCheckpoint {
        view,
        partition: p.partition,
        files: p
            .files
            .into_iter()
            .map(|f| proto::CheckpointFile {
                path: f.path,
                bytes: f.bytes,
                rows: f.rows,
                part: f.part,
            })
            .collect(),
        emitted_until: p.emitted_until,
        watermark: p.watermark,
        view_rows: p.view_rows,
    }
}

/// Makes a lost state partition this worker's, as the checkpoint in `request` holds
/// it (or empty, without one). Returns the bytes read.
pub async fn restore(state: &WorkerState, request: proto::RestorePartitionRequest) -> Result<u64> {
    let (view, partition) = (request.view.clone(), request.partition);
    let Some(interval) = request.checkpoint.map(IntervalId) else {
        state
            .partitions
            .adopt(&view, partition, PartitionSlot::default());
        info!(view = %view, partition, "restored state partition empty (no checkpoint of it)");
        return Ok(0);
    };
    let store = state
        .store()
        .ok_or_else(|| Error::Internal("no object store installed".into()))?;
    let declared = declared_tables(state, &view).await?;
    let mut restored = StatePartition {
        emitted_until: request.emitted_until,
        watermark: request.watermark,
        ..Default::default()
    };
    let mut rows = Vec::new();
    let mut bytes: u64 = 0;
    for file in request.files {
        let file = checkpoint::CheckpointFile {
            path: file.path,
            part: file.part,
            bytes: file.bytes,
            rows: file.rows,
        };
        let batches = checkpoint::read_part(&store, &file).await?;
        bytes = bytes.saturating_add(file.bytes);
        if file.part == VIEW_ROWS {
            rows = batches;
        } else if declared.contains(&file.part) {
            restored.set(&file.part, batches);
        } else {
            return Err(Error::Internal(format!(
                "{} holds table {} that stage {view} does not keep (it keeps {})",
                file.path,
                file.part,
                declared.iter().cloned().collect::<Vec<_>>().join(", ")
            )));
        }
    }
    // Versions before the checkpoint are gone: ad-hoc reads of them say so.
    let versions = BTreeMap::from([(interval, Arc::new(rows))]);
    state.partitions.adopt(
        &view,
        partition,
        PartitionSlot {
            state: Arc::new(restored),
            versions,
            expired: true,
            pending: None,
        },
    );
    info!(view = %view, partition, %interval, bytes, "restored state partition from a checkpoint");
    Ok(bytes)
}

/// Waits for the checkpoint of `interval` started here to be written.
pub async fn wait(
    state: &WorkerState,
    interval: IntervalId,
) -> Result<Vec<proto::PartitionCheckpoint>> {
    let writing = state.checkpoint(interval).ok_or_else(|| {
        Error::Internal(format!(
            "no checkpoint of interval {interval} was started on this worker"
        ))
    })?;
    writing.await.map_err(Error::Internal)
}

/// The names of the tables stage `view`'s operator keeps, as installed here.
async fn declared_tables(state: &WorkerState, view: &str) -> Result<BTreeSet<String>> {
    let installed = state.installed.lock().await;
    let stage = installed
        .as_ref()
        .and_then(|i| i.views.get(view))
        .ok_or_else(|| Error::Internal(format!("stage {view} is not installed here")))?;
    Ok(stage
        .operators
        .reduce
        .state()
        .into_iter()
        .map(|t| t.name)
        .collect())
}
