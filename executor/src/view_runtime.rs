//! What every task of a view shares: the operator that runs its plan, the shape of
//! its output rows, and the watermark its window sees after an interval.
//!
//! The stage DAG itself is scheduled by the coordinator and run by workers (see
//! [`crate::worker`]); these are the pieces both sides need.

use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use dstream_planner::{StreamPlan, WindowSpec};
use dstream_storage::{IntervalId, Timeline};

use crate::error::Result;
use crate::operator::{AggregateOperator, AppendOperator, KeyedOperator, StageOperators};

/// The rows of one partition of a view.
pub type ViewPartition = Arc<Vec<RecordBatch>>;

/// The operators that run stage `plan`.
pub fn operator_for(plan: Arc<StreamPlan>) -> Result<StageOperators> {
    Ok(match (&plan.aggregate, &plan.keyed) {
        (Some(_), _) => StageOperators::of(AggregateOperator::new(plan)?),
        (None, Some(_)) => StageOperators::of(KeyedOperator::new(plan)?),
        (None, None) => StageOperators::of(AppendOperator::new(plan)),
    })
}

/// Gives output rows exactly the view's `schema` (names and nullability as planned),
/// dropping empty batches.
pub fn conform(schema: &SchemaRef, rows: Vec<RecordBatch>) -> Result<Vec<RecordBatch>> {
    rows.into_iter()
        .filter(|b| b.num_rows() > 0)
        .map(|b| {
            if b.schema() == *schema {
                return Ok(b);
            }
            let columns = b
                .columns()
                .iter()
                .zip(schema.fields())
                .map(|(c, f)| {
                    if c.data_type() == f.data_type() {
                        Ok(c.clone())
                    } else {
                        arrow::compute::cast(c, f.data_type())
                    }
                })
                .collect::<std::result::Result<Vec<_>, _>>()?;
            let options =
                arrow::array::RecordBatchOptions::new().with_row_count(Some(b.num_rows()));
            Ok(RecordBatch::try_new_with_options(
                schema.clone(),
                columns,
                &options,
            )?)
        })
        .collect()
}

/// The watermark a view's window sees after `interval`: the interval's end for
/// processing-time windows, the source's watermark for event-time windows.
pub fn window_watermark(
    window: Option<&WindowSpec>,
    interval: IntervalId,
    timeline: &Timeline,
    source_watermark: Option<i64>,
) -> Option<i64> {
    match window {
        Some(w) if w.is_processing_time() => Some(timeline.end_nanos(interval)),
        Some(_) => source_watermark,
        None => None,
    }
}
