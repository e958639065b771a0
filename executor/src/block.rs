//! Blocks: the records of one source received during one interval.

use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch, TimestampNanosecondArray};
use arrow::datatypes::SchemaRef;
use dstream_storage::IntervalId;

use crate::error::Result;

/// The rows of one source that arrived in one interval, in the source's full schema
/// (declared columns plus `_interval`). Immutable once sealed.
#[derive(Clone, Debug)]
pub struct Block {
    pub source: String,
    pub interval: IntervalId,
    pub schema: SchemaRef,
    pub batches: Vec<RecordBatch>,
}

impl Block {
    pub fn num_rows(&self) -> usize {
        self.batches.iter().map(|b| b.num_rows()).sum()
    }
}

/// Appends the `_interval` column (the interval's start) to records of `record_batch`.
pub fn with_interval_column(
    record_batch: &RecordBatch,
    full_schema: &SchemaRef,
    interval_start_nanos: i64,
) -> Result<RecordBatch> {
    let mut columns: Vec<ArrayRef> = record_batch.columns().to_vec();
    let stamp = TimestampNanosecondArray::from_value(interval_start_nanos, record_batch.num_rows());
    columns.push(Arc::new(stamp));
    Ok(RecordBatch::try_new(full_schema.clone(), columns)?)
}
