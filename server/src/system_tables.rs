//! System tables, queryable with SQL like any table:
//!
//! - `dstream_intervals`: one row per recent interval, with its input, its scheduling
//!   delay (how late processing started after the interval ended), its processing
//!   time and total delay, as the Spark Streaming UI shows them, and the tasks and
//!   shuffle bytes it took;
//! - `dstream_workers`: every worker that joined, its address, status and heartbeat,
//!   and — asked of each reachable worker (`Status`) when the table is scanned — its
//!   running tasks, the input blocks and the state partitions it holds.
//!
//! - `dstream_checkpoints`: one row per recent checkpoint: its interval, when it was
//!   taken, how long it took to commit, its size, and whether it committed (and if
//!   not, why).
//!
//! - `dstream_recoveries`: one row per recovery from lost workers: when, which
//!   workers, how many receivers and state partitions moved, the checkpoint loaded,
//!   the intervals replayed, how long it took, and whether it completed.
//!
//! `dstream_intervals` is built when a query's context is made, from the engine's
//! interval history; `dstream_workers` when it is scanned.

use std::sync::Arc;
use std::time::Duration;

use arrow::array::{
    ArrayRef, Float64Array, RecordBatch, StringArray, TimestampNanosecondArray, UInt32Array,
    UInt64Array,
};
use arrow::datatypes::SchemaRef;
use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use async_trait::async_trait;
use datafusion::catalog::{MemTable, Session, TableProvider};
use datafusion::common::DataFusionError;
use datafusion::datasource::TableType;
use datafusion::logical_expr::Expr;
use datafusion::physical_plan::ExecutionPlan;
use dstream_executor::rpc::proto;
use futures::future::join_all;

use crate::cluster::Cluster;
use crate::cluster::checkpoint::CheckpointStat;
use crate::cluster::recovery::RecoveryStat;
use crate::cluster::remote_table::scan_fetched;
use crate::engine::IntervalStat;
use crate::error::Result;

pub const INTERVALS: &str = "dstream_intervals";
pub const WORKERS: &str = "dstream_workers";
pub const CHECKPOINTS: &str = "dstream_checkpoints";
pub const RECOVERIES: &str = "dstream_recoveries";

pub fn millis(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// `dstream_intervals` over `history` (oldest first).
pub fn intervals_table(history: &[IntervalStat]) -> Result<MemTable> {
    let schema = Arc::new(Schema::new(vec![
        Field::new("interval_id", DataType::UInt64, false),
        Field::new(
            "interval_start",
            DataType::Timestamp(TimeUnit::Nanosecond, None),
            false,
        ),
        Field::new("input_rows", DataType::UInt64, false),
        Field::new("scheduling_delay_ms", DataType::Float64, false),
        Field::new("processing_time_ms", DataType::Float64, false),
        Field::new("total_delay_ms", DataType::Float64, false),
        Field::new("map_tasks", DataType::UInt64, false),
        Field::new("map_tasks_ahead", DataType::UInt64, false),
        Field::new("reduce_tasks", DataType::UInt64, false),
        Field::new("shuffle_bytes", DataType::UInt64, false),
        Field::new("workers", DataType::UInt64, false),
        Field::new("speculative_tasks", DataType::UInt64, false),
    ]));
    let columns: Vec<ArrayRef> = vec![
        Arc::new(UInt64Array::from_iter_values(
            history.iter().map(|h| h.interval.0),
        )),
        Arc::new(TimestampNanosecondArray::from_iter_values(
            history.iter().map(|h| h.start_nanos),
        )),
        Arc::new(UInt64Array::from_iter_values(
            history.iter().map(|h| h.input_rows),
        )),
        Arc::new(Float64Array::from_iter_values(
            history.iter().map(|h| millis(h.scheduling_delay)),
        )),
        Arc::new(Float64Array::from_iter_values(
            history.iter().map(|h| millis(h.processing_time)),
        )),
        Arc::new(Float64Array::from_iter_values(history.iter().map(|h| {
            millis(h.scheduling_delay.saturating_add(h.processing_time))
        }))),
        Arc::new(UInt64Array::from_iter_values(
            history.iter().map(|h| h.map_tasks),
        )),
        Arc::new(UInt64Array::from_iter_values(
            history.iter().map(|h| h.map_tasks_ahead),
        )),
        Arc::new(UInt64Array::from_iter_values(
            history.iter().map(|h| h.reduce_tasks),
        )),
        Arc::new(UInt64Array::from_iter_values(
            history.iter().map(|h| h.shuffle_bytes),
        )),
        Arc::new(UInt64Array::from_iter_values(
            history.iter().map(|h| h.workers),
        )),
        Arc::new(UInt64Array::from_iter_values(
            history.iter().map(|h| h.speculative_tasks),
        )),
    ];
    let batch = RecordBatch::try_new(schema.clone(), columns)
        .map_err(datafusion::error::DataFusionError::from)?;
    Ok(MemTable::try_new(schema, vec![vec![batch]])?)
}

/// `dstream_checkpoints` over `history` (oldest first).
pub fn checkpoints_table(history: &[CheckpointStat]) -> Result<MemTable> {
    let schema = Arc::new(Schema::new(vec![
        Field::new("interval_id", DataType::UInt64, false),
        Field::new(
            "started_at",
            DataType::Timestamp(TimeUnit::Nanosecond, None),
            false,
        ),
        Field::new("duration_ms", DataType::Float64, false),
        Field::new("status", DataType::Utf8, false),
        Field::new("views", DataType::UInt64, false),
        Field::new("partitions", DataType::UInt64, false),
        Field::new("files", DataType::UInt64, false),
        Field::new("bytes", DataType::UInt64, false),
        Field::new("error", DataType::Utf8, true),
    ]));
    let columns: Vec<ArrayRef> = vec![
        Arc::new(UInt64Array::from_iter_values(
            history.iter().map(|h| h.interval.0),
        )),
        Arc::new(TimestampNanosecondArray::from_iter_values(
            history.iter().map(|h| h.started_at_nanos),
        )),
        Arc::new(Float64Array::from_iter_values(
            history.iter().map(|h| millis(h.duration)),
        )),
        Arc::new(StringArray::from_iter_values(history.iter().map(|h| {
            if h.error.is_some() {
                "failed"
            } else {
                "committed"
            }
        }))),
        Arc::new(UInt64Array::from_iter_values(
            history.iter().map(|h| h.views),
        )),
        Arc::new(UInt64Array::from_iter_values(
            history.iter().map(|h| h.partitions),
        )),
        Arc::new(UInt64Array::from_iter_values(
            history.iter().map(|h| h.files),
        )),
        Arc::new(UInt64Array::from_iter_values(
            history.iter().map(|h| h.bytes),
        )),
        Arc::new(StringArray::from(
            history.iter().map(|h| h.error.clone()).collect::<Vec<_>>(),
        )),
    ];
    let batch = RecordBatch::try_new(schema.clone(), columns)
        .map_err(datafusion::error::DataFusionError::from)?;
    Ok(MemTable::try_new(schema, vec![vec![batch]])?)
}

/// `dstream_recoveries` over `history` (oldest first).
pub fn recoveries_table(history: &[RecoveryStat]) -> Result<MemTable> {
    let schema = Arc::new(Schema::new(vec![
        Field::new(
            "started_at",
            DataType::Timestamp(TimeUnit::Nanosecond, None),
            false,
        ),
        Field::new("interval_id", DataType::UInt64, false),
        Field::new("lost_workers", DataType::Utf8, false),
        Field::new("receivers", DataType::UInt64, false),
        Field::new("partitions", DataType::UInt64, false),
        Field::new("checkpoint_interval", DataType::UInt64, true),
        Field::new("replayed_intervals", DataType::UInt64, false),
        Field::new("duration_ms", DataType::Float64, false),
        Field::new("status", DataType::Utf8, false),
        Field::new("error", DataType::Utf8, true),
    ]));
    let columns: Vec<ArrayRef> = vec![
        Arc::new(TimestampNanosecondArray::from_iter_values(
            history.iter().map(|h| h.started_at_nanos),
        )),
        Arc::new(UInt64Array::from_iter_values(
            history.iter().map(|h| h.interval.0),
        )),
        Arc::new(StringArray::from_iter_values(history.iter().map(|h| {
            h.workers
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(",")
        }))),
        Arc::new(UInt64Array::from_iter_values(
            history.iter().map(|h| h.receivers),
        )),
        Arc::new(UInt64Array::from_iter_values(
            history.iter().map(|h| h.partitions),
        )),
        Arc::new(UInt64Array::from(
            history
                .iter()
                .map(|h| h.checkpoint.map(|c| c.0))
                .collect::<Vec<_>>(),
        )),
        Arc::new(UInt64Array::from_iter_values(
            history.iter().map(|h| h.replayed_intervals),
        )),
        Arc::new(Float64Array::from_iter_values(
            history.iter().map(|h| millis(h.duration)),
        )),
        Arc::new(StringArray::from_iter_values(history.iter().map(|h| {
            if h.error.is_some() {
                "failed"
            } else {
                "recovered"
            }
        }))),
        Arc::new(StringArray::from(
            history.iter().map(|h| h.error.clone()).collect::<Vec<_>>(),
        )),
    ];
    let batch = RecordBatch::try_new(schema.clone(), columns)
        .map_err(datafusion::error::DataFusionError::from)?;
    Ok(MemTable::try_new(schema, vec![vec![batch]])?)
}

/// How long a scan of `dstream_workers` waits for a worker's status.
const STATUS_WAIT: Duration = Duration::from_secs(1);

fn workers_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("id", DataType::UInt64, false),
        Field::new("address", DataType::Utf8, false),
        Field::new("pid", DataType::UInt32, false),
        Field::new("status", DataType::Utf8, false),
        Field::new("running_tasks", DataType::UInt32, false),
        Field::new("tasks_done", DataType::UInt64, false),
        Field::new("blocks", DataType::UInt64, true),
        Field::new("state_partitions", DataType::UInt64, true),
        Field::new("last_heartbeat_ms", DataType::Float64, false),
        Field::new("up_seconds", DataType::Float64, false),
        Field::new("supervisor", DataType::Utf8, true),
    ]))
}

/// One row of `dstream_workers`: a worker that joined, and what it reports.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct WorkerRow {
    pub id: u64,
    /// Where its gRPC and Flight services listen.
    pub address: String,
    pub pid: u32,
    /// `alive`, `leaving`, `left` or `dead`.
    pub status: String,
    pub running_tasks: u32,
    pub tasks_done: u64,
    /// Input blocks it holds (`null`: it did not answer).
    pub blocks: Option<u64>,
    /// State partitions it holds (`null`: it did not answer).
    pub state_partitions: Option<u64>,
    pub last_heartbeat_ms: f64,
    pub up_seconds: f64,
    /// For a local worker, what its supervisor reports (restarts, exits).
    pub supervisor: Option<String>,
}

/// `dstream_workers`: the registry, with each reachable worker's own status.
#[derive(Debug)]
pub struct WorkersTable {
    pub cluster: Arc<Cluster>,
    pub supervision: crate::cluster::local::Supervision,
}

impl WorkersTable {
    /// The table's rows: asks every reachable worker for its status, at once; a
    /// worker that does not answer in time shows its last heartbeat's task count and
    /// NULL holdings.
    pub async fn rows(&self) -> Vec<WorkerRow> {
        let workers = self.cluster.workers();
        let asks = workers.iter().map(|w| {
            let reachable = w.is_reachable();
            async move {
                if !reachable {
                    return None;
                }
                let answer =
                    tokio::time::timeout(STATUS_WAIT, w.client.status(proto::StatusRequest {}))
                        .await;
                match answer {
                    Ok(Ok(status)) => Some(status),
                    _ => None,
                }
            }
        });
        let statuses = join_all(asks).await;
        let supervision = self.supervision.by_pid();
        workers
            .iter()
            .zip(statuses)
            .map(|(w, status)| WorkerRow {
                id: w.id,
                address: w.address.clone(),
                pid: w.pid,
                status: w.status.to_string(),
                running_tasks: status.as_ref().map_or(w.running_tasks, |s| s.running_tasks),
                tasks_done: w.tasks_done,
                blocks: status.as_ref().map(|s| s.blocks),
                state_partitions: status.as_ref().map(|s| s.state_partitions),
                last_heartbeat_ms: millis(w.last_seen.elapsed()),
                up_seconds: w.joined.elapsed().as_secs_f64(),
                supervisor: supervision.get(&w.pid).cloned(),
            })
            .collect()
    }
}

#[async_trait]
impl TableProvider for WorkersTable {
    fn schema(&self) -> SchemaRef {
        workers_schema()
    }

    fn table_type(&self) -> TableType {
        TableType::View
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> std::result::Result<Arc<dyn ExecutionPlan>, DataFusionError> {
        let batch = workers_batch(&self.rows().await)
            .map_err(|e| DataFusionError::External(Box::new(e)))?;
        scan_fetched(
            &workers_schema(),
            vec![vec![batch]],
            state,
            projection,
            filters,
            limit,
        )
        .await
    }
}

/// The rows of `dstream_workers` as a batch.
fn workers_batch(rows: &[WorkerRow]) -> Result<RecordBatch> {
    let columns: Vec<ArrayRef> = vec![
        Arc::new(UInt64Array::from_iter_values(rows.iter().map(|w| w.id))),
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|w| w.address.as_str()),
        )),
        Arc::new(UInt32Array::from_iter_values(rows.iter().map(|w| w.pid))),
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|w| w.status.as_str()),
        )),
        Arc::new(UInt32Array::from_iter_values(
            rows.iter().map(|w| w.running_tasks),
        )),
        Arc::new(UInt64Array::from_iter_values(
            rows.iter().map(|w| w.tasks_done),
        )),
        Arc::new(UInt64Array::from_iter(rows.iter().map(|w| w.blocks))),
        Arc::new(UInt64Array::from_iter(
            rows.iter().map(|w| w.state_partitions),
        )),
        Arc::new(Float64Array::from_iter_values(
            rows.iter().map(|w| w.last_heartbeat_ms),
        )),
        Arc::new(Float64Array::from_iter_values(
            rows.iter().map(|w| w.up_seconds),
        )),
        Arc::new(StringArray::from_iter(
            rows.iter().map(|w| w.supervisor.as_deref()),
        )),
    ];
    Ok(RecordBatch::try_new(workers_schema(), columns).map_err(DataFusionError::from)?)
}
