//! System tables, queryable with SQL like any table:
//!
//! - `dstream_intervals`: one row per recent interval, with its input, its scheduling
//!   delay (how late processing started after the interval ended), its processing
//!   time and total delay, as the Spark Streaming UI shows them, and the tasks and
//!   shuffle bytes it took;
//! - `dstream_workers`: every worker that joined, its address, status and heartbeat.
//!
//! Both are built when a query's context is made, from the engine's interval history
//! and the cluster registry.

use std::sync::Arc;

use arrow::array::{
    ArrayRef, Float64Array, RecordBatch, StringArray, TimestampNanosecondArray, UInt32Array,
    UInt64Array,
};
use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use datafusion::catalog::MemTable;

use crate::cluster::WorkerRecord;
use crate::engine::IntervalStat;
use crate::error::Result;

pub const INTERVALS: &str = "dstream_intervals";
pub const WORKERS: &str = "dstream_workers";

fn millis(d: std::time::Duration) -> f64 {
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
        Field::new("reduce_tasks", DataType::UInt64, false),
        Field::new("shuffle_bytes", DataType::UInt64, false),
        Field::new("workers", DataType::UInt64, false),
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
        Arc::new(Float64Array::from_iter_values(
            history
                .iter()
                .map(|h| millis(h.scheduling_delay + h.processing_time)),
        )),
        Arc::new(UInt64Array::from_iter_values(
            history.iter().map(|h| h.map_tasks),
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
    ];
    let batch = RecordBatch::try_new(schema.clone(), columns)
        .map_err(datafusion::error::DataFusionError::from)?;
    Ok(MemTable::try_new(schema, vec![vec![batch]])?)
}

/// `dstream_workers` over `workers` (by id).
pub fn workers_table(workers: &[WorkerRecord]) -> Result<MemTable> {
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::UInt64, false),
        Field::new("address", DataType::Utf8, false),
        Field::new("pid", DataType::UInt32, false),
        Field::new("status", DataType::Utf8, false),
        Field::new("running_tasks", DataType::UInt32, false),
        Field::new("tasks_done", DataType::UInt64, false),
        Field::new("last_heartbeat_ms", DataType::Float64, false),
        Field::new("up_seconds", DataType::Float64, false),
    ]));
    let columns: Vec<ArrayRef> = vec![
        Arc::new(UInt64Array::from_iter_values(workers.iter().map(|w| w.id))),
        Arc::new(StringArray::from_iter_values(
            workers.iter().map(|w| w.address.as_str()),
        )),
        Arc::new(UInt32Array::from_iter_values(workers.iter().map(|w| w.pid))),
        Arc::new(StringArray::from_iter_values(
            workers.iter().map(|w| w.status.to_string()),
        )),
        Arc::new(UInt32Array::from_iter_values(
            workers.iter().map(|w| w.running_tasks),
        )),
        Arc::new(UInt64Array::from_iter_values(
            workers.iter().map(|w| w.tasks_done),
        )),
        Arc::new(Float64Array::from_iter_values(
            workers.iter().map(|w| millis(w.last_seen.elapsed())),
        )),
        Arc::new(Float64Array::from_iter_values(
            workers.iter().map(|w| w.joined.elapsed().as_secs_f64()),
        )),
    ];
    let batch = RecordBatch::try_new(schema.clone(), columns)
        .map_err(datafusion::error::DataFusionError::from)?;
    Ok(MemTable::try_new(schema, vec![vec![batch]])?)
}
