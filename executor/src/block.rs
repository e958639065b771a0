//! Blocks: the records of one source received during one interval.

use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch, TimestampNanosecondArray};
use arrow::datatypes::SchemaRef;
use dstream_storage::IntervalId;

use crate::error::Result;

/// The default for the most rows in one block. An interval's input is cut into blocks
/// of at most this many rows, and each block is one map task, so large intervals are
/// processed in parallel.
pub const BLOCK_ROWS: usize = 65_536;

/// Rows of one source that arrived in one interval — all of them or, for large
/// intervals, a slice of them — in the source's full schema (declared
/// columns plus `_interval`). Immutable once sealed.
///
/// The changes one partition of a stage made in an interval are a block too, read by
/// the stages after it: `source` is the stage, `index` the partition, `batches` the
/// rows it inserted and `deletes` those it deleted.
#[derive(Clone, Debug)]
pub struct Block {
    pub source: String,
    pub interval: IntervalId,
    /// Position of the block within its interval.
    pub index: usize,
    pub schema: SchemaRef,
    pub batches: Vec<RecordBatch>,
    /// Rows the block retracts: empty for a source's block.
    pub deletes: Vec<RecordBatch>,
}

impl Block {
    pub fn num_rows(&self) -> usize {
        self.batches.iter().map(|b| b.num_rows()).sum()
    }
}

/// Cuts an interval's batches into blocks of at most `max_rows` rows.
pub fn cut_blocks(
    source: &str,
    interval: IntervalId,
    schema: &SchemaRef,
    batches: Vec<RecordBatch>,
    max_rows: usize,
) -> Vec<Block> {
    let max_rows = max_rows.max(1);
    let mut blocks = Vec::new();
    let mut current: Vec<RecordBatch> = Vec::new();
    let mut rows = 0;
    let mut flush = |current: &mut Vec<RecordBatch>, rows: &mut usize| {
        if !current.is_empty() {
            blocks.push(Block {
                source: source.to_string(),
                interval,
                index: blocks.len(),
                schema: schema.clone(),
                batches: std::mem::take(current),
                deletes: Vec::new(),
            });
            *rows = 0;
        }
    };
    for batch in batches {
        let mut offset = 0;
        while offset < batch.num_rows() {
            // rows < max_rows and offset < num_rows here, so take > 0 and neither sum
            // passes its bound.
            let take = max_rows
                .saturating_sub(rows)
                .min(batch.num_rows().saturating_sub(offset));
            current.push(batch.slice(offset, take));
            offset = offset.saturating_add(take);
            rows = rows.saturating_add(take);
            if rows == max_rows {
                flush(&mut current, &mut rows);
            }
        }
    }
    flush(&mut current, &mut rows);
    blocks
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

#[cfg(test)]
mod tests {
    use arrow::array::Int64Array;
    use arrow::datatypes::{DataType, Field, Schema};

    use super::*;

    #[test]
    fn intervals_are_cut_into_bounded_blocks_without_losing_rows() -> Result<()> {
        let schema = Arc::new(Schema::new(vec![Field::new("a", DataType::Int64, false)]));
        let batch = |n: usize| {
            RecordBatch::try_new(
                schema.clone(),
                vec![Arc::new(Int64Array::from_iter_values(0..n as i64))],
            )
        };
        let batches = vec![batch(BLOCK_ROWS + 10)?, batch(5)?, batch(BLOCK_ROWS)?];
        let blocks = cut_blocks("s", IntervalId(3), &schema, batches, BLOCK_ROWS);
        let sizes: Vec<usize> = blocks.iter().map(|b| b.num_rows()).collect();
        assert_eq!(sizes, vec![BLOCK_ROWS, BLOCK_ROWS, 15]);
        assert_eq!(
            blocks.iter().map(|b| b.index).collect::<Vec<_>>(),
            vec![0, 1, 2]
        );
        assert!(cut_blocks("s", IntervalId(3), &schema, vec![], BLOCK_ROWS).is_empty());
        Ok(())
    }
}
