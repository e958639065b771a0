//! Ingest: turning what a receiver delivered into an interval's block.
//!
//! [`SourceRuntime`] owns a source's receiver and its watermark. Sealing interval *t*
//! adds the `_interval` column, drops rows behind the watermark of interval *t-1*
//! (counting them as late), and advances the watermark to the maximum of the watermark
//! expression over the interval's rows. Recent blocks are retained by whoever stores
//! them (the worker's block store), not here.
//!
//! A watermark expression that never decreases as its event-time column grows (the
//! usual `ts - INTERVAL '5' SECOND`) is evaluated on one row per batch, the row with
//! the latest event time, instead of on every row.

use std::sync::Arc;

use arrow::array::{
    Array, AsArray, BooleanArray, Int64Array, RecordBatch, Scalar, TimestampNanosecondArray,
};
use arrow::compute::kernels::cmp::gt_eq;
use arrow::compute::{cast, filter_record_batch, is_null, or_kleene};
use arrow::datatypes::{DataType, TimeUnit, TimestampNanosecondType};
use datafusion::common::DFSchema;
use datafusion::logical_expr::Operator;
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_expr::expressions::{BinaryExpr, CastExpr, Column, Literal};
use datafusion::prelude::SessionContext;
use dstream_planner::SourceDef;
use dstream_storage::{IntervalId, Timeline};

use crate::block::{Block, cut_blocks, with_interval_column};
use crate::connector::{
    Receiver, ReceiverPosition, ReceiverStats, Split, open_receiver, replayable,
};
use crate::error::{Error, Result};

/// The live side of one source.
#[derive(Debug)]
pub struct SourceRuntime {
    def: Arc<SourceDef>,
    receiver: Box<dyn Receiver>,
    watermark_expr: Option<Arc<dyn PhysicalExpr>>,
    watermark_column: Option<usize>,
    /// The watermark expression never decreases as its column grows.
    watermark_monotone: bool,
    watermark: Option<i64>,
    late_rows: u64,
    block_rows: usize,
    split: Split,
}

/// Blocks of one split of a source in one interval are numbered from
/// `split.index * BLOCKS_PER_SPLIT`, so the splits' blocks never collide and sort in
/// split order.
pub const BLOCKS_PER_SPLIT: usize = 1 << 16;

/// Where a source stood when its receiver was released: the receiver's position,
/// the watermark and the count of late rows.
#[derive(Clone, Debug, Default)]
pub struct SourceHandover {
    pub position: ReceiverPosition,
    pub watermark: Option<i64>,
    pub late_rows: u64,
}

/// What users can see about a source.
#[derive(Clone, Debug, Default)]
pub struct SourceStats {
    pub receiver: ReceiverStats,
    pub late_rows: u64,
    pub watermark: Option<i64>,
}

impl SourceRuntime {
    /// Opens the source's receiver and compiles its watermark expression. Intervals
    /// are cut into blocks of at most `block_rows` rows.
    pub fn open(
        def: Arc<SourceDef>,
        ctx: &SessionContext,
        block_rows: usize,
        split: Split,
    ) -> Result<Self> {
        let receiver = open_receiver(&def, split)?;
        let (watermark_expr, watermark_column, watermark_monotone) = match &def.watermark {
            Some(wm) => {
                let schema = DFSchema::try_from(def.schema.as_ref().clone())?;
                let expr = ctx.create_physical_expr(wm.expr.clone(), &schema)?;
                let column = def.schema.index_of(&wm.column)?;
                let monotone = monotone_in(&expr, column);
                (Some(expr), Some(column), monotone)
            }
            None => (None, None, false),
        };
        Ok(SourceRuntime {
            def,
            receiver,
            watermark_expr,
            watermark_column,
            watermark_monotone,
            watermark: None,
            late_rows: 0,
            block_rows,
            split,
        })
    }

    pub fn def(&self) -> &Arc<SourceDef> {
        &self.def
    }

    /// Which of the source's receivers this is.
    pub fn split(&self) -> Split {
        self.split
    }

    /// Sets the watermark rows are checked against: the source's, over all its
    /// splits, as the coordinator knows it. The next seal drops rows older than it
    /// and advances it by its own rows.
    pub fn set_watermark(&mut self, watermark: Option<i64>) {
        if watermark > self.watermark {
            self.watermark = watermark;
        }
    }

    /// The event-time watermark, nanoseconds since the epoch.
    pub fn watermark(&self) -> Option<i64> {
        self.watermark
    }

    /// Stops the receiver and says where the source stood, for
    /// [`SourceRuntime::resume`] on another worker.
    pub fn release(&mut self) -> SourceHandover {
        SourceHandover {
            position: self.receiver.release(),
            watermark: self.watermark,
            late_rows: self.late_rows,
        }
    }

    /// Carries on from where a released source stood.
    pub fn resume(&mut self, handover: SourceHandover) {
        self.receiver.resume(handover.position);
        self.watermark = handover.watermark;
        self.late_rows = handover.late_rows;
    }

    /// File sources: the files read since the last call.
    pub fn take_new_files(&mut self) -> Vec<String> {
        self.receiver.take_new_files()
    }

    pub fn stats(&self) -> SourceStats {
        SourceStats {
            receiver: self.receiver.stats(),
            late_rows: self.late_rows,
            watermark: self.watermark,
        }
    }

    /// Whether this source's seals can be done again from their lineage
    /// ([`SourceRuntime::replay`]) instead of being copied.
    pub fn replayable(&self) -> bool {
        replayable(&self.def)
    }

    /// Seals `interval` of `split` again, with a receiver opened for that alone,
    /// dropping late rows against `watermark` as the first seal did. The source must be
    /// [replayable](crate::connector::replayable): then the blocks are the first
    /// seal's, row for row.
    pub fn replay(
        def: Arc<SourceDef>,
        ctx: &SessionContext,
        block_rows: usize,
        split: Split,
        interval: IntervalId,
        timeline: &Timeline,
        watermark: Option<i64>,
    ) -> Result<Vec<Arc<Block>>> {
        if !replayable(&def) {
            return Err(Error::Internal(format!(
                "source {} cannot seal an interval again",
                def.name
            )));
        }
        let mut runtime = SourceRuntime::open(def, ctx, block_rows, split)?;
        runtime.watermark = watermark;
        runtime.seal(interval, timeline)
    }

    /// Hands a pushed source's receiver the records the coordinator accepted for the
    /// interval about to be sealed.
    pub fn push(&mut self, batches: Vec<RecordBatch>, malformed: u64) -> Result<()> {
        self.receiver.push(batches, malformed)
    }

    /// Seals `interval`: returns its blocks and advances the watermark.
    pub fn seal(&mut self, interval: IntervalId, timeline: &Timeline) -> Result<Vec<Arc<Block>>> {
        let records = self.receiver.seal(interval, timeline)?;
        let start = timeline.start_nanos(interval);
        let mut batches = Vec::with_capacity(records.len());
        for record_batch in &records {
            let batch = with_interval_column(record_batch, &self.def.schema, start)?;
            let batch = self.drop_late(batch)?;
            if batch.num_rows() > 0 {
                batches.push(batch);
            }
        }
        for batch in &batches {
            self.advance_watermark(batch)?;
        }
        let first = (self.split.index as usize).saturating_mul(BLOCKS_PER_SPLIT);
        Ok(cut_blocks(
            &self.def.name,
            interval,
            &self.def.schema,
            batches,
            self.block_rows,
        )
        .into_iter()
        .map(|mut block| {
            block.index = block.index.saturating_add(first);
            Arc::new(block)
        })
        .collect())
    }

    fn drop_late(&mut self, batch: RecordBatch) -> Result<RecordBatch> {
        let (Some(column), Some(wm)) = (self.watermark_column, self.watermark) else {
            return Ok(batch);
        };
        let times = event_times(&batch, column)?;
        let bound = Scalar::new(TimestampNanosecondArray::from(vec![wm]));
        // A row without an event time is not late; it belongs to no window.
        let keep: BooleanArray = or_kleene(&gt_eq(&times, &bound)?, &is_null(&times)?)?;
        if keep.true_count() == batch.num_rows() {
            return Ok(batch);
        }
        let kept = filter_record_batch(&batch, &keep)?;
        let late = batch.num_rows().saturating_sub(kept.num_rows()) as u64;
        self.late_rows = self.late_rows.saturating_add(late);
        Ok(kept)
    }

    fn advance_watermark(&mut self, batch: &RecordBatch) -> Result<()> {
        let Some(expr) = &self.watermark_expr else {
            return Ok(());
        };
        let latest_by = self.watermark_column.filter(|_| self.watermark_monotone);
        if let Some(max) = max_watermark(expr, batch, latest_by)? {
            self.watermark = Some(self.watermark.map_or(max, |w| w.max(max)));
        }
        Ok(())
    }
}

/// The greatest value of the watermark expression over `batch`, in nanoseconds. With
/// `latest_by`, the expression is monotone in that column and is evaluated only at
/// the row where the column is greatest.
fn max_watermark(
    expr: &Arc<dyn PhysicalExpr>,
    batch: &RecordBatch,
    latest_by: Option<usize>,
) -> Result<Option<i64>> {
    let latest;
    let batch = match latest_by {
        Some(column) => {
            let times = event_times(batch, column)?;
            match latest_row(times.as_primitive::<TimestampNanosecondType>()) {
                Some(row) => {
                    latest = batch.slice(row, 1);
                    &latest
                }
                None => return Ok(None),
            }
        }
        None => batch,
    };
    let values = expr.evaluate(batch)?.into_array(batch.num_rows())?;
    let nanos = cast(&values, &DataType::Timestamp(TimeUnit::Nanosecond, None))?;
    let nanos = cast(&nanos, &DataType::Int64)?;
    let nanos = nanos
        .as_any()
        .downcast_ref::<Int64Array>()
        .ok_or_else(|| Error::Internal("watermark cast did not give Int64".into()))?;
    Ok(arrow::compute::max(nanos))
}

/// A column of event times as nanosecond timestamps.
fn event_times(batch: &RecordBatch, column: usize) -> Result<Arc<dyn Array>> {
    Ok(cast(
        batch.column(column),
        &DataType::Timestamp(TimeUnit::Nanosecond, None),
    )?)
}

/// The row with the latest non-null time, if any.
fn latest_row(times: &TimestampNanosecondArray) -> Option<usize> {
    let mut latest: Option<(usize, i64)> = None;
    for (row, &time) in times.values().iter().enumerate() {
        if times.is_valid(row) && latest.is_none_or(|(_, t)| time > t) {
            latest = Some((row, time));
        }
    }
    latest.map(|(row, _)| row)
}

/// Whether `expr` reads no column but `column` and never decreases as it grows, so
/// that its maximum over a batch is its value at the row with the greatest `column`:
/// the column itself, plus or minus constants, cast to a timestamp. (DataFusion's own
/// ordering rules call time ± interval unordered because it could wrap around at the
/// ends of the timestamp range, far from any real event time.) Anything else is
/// evaluated on every row.
fn monotone_in(expr: &Arc<dyn PhysicalExpr>, column: usize) -> bool {
    #[derive(PartialEq)]
    enum Shape {
        Constant,
        Increasing,
        Other,
    }
    fn shape(expr: &Arc<dyn PhysicalExpr>, column: usize) -> Shape {
        if let Some(c) = expr.downcast_ref::<Column>() {
            return if c.index() == column {
                Shape::Increasing
            } else {
                Shape::Other
            };
        }
        if expr.downcast_ref::<Literal>().is_some() {
            return Shape::Constant;
        }
        if let Some(c) = expr.downcast_ref::<CastExpr>() {
            return match c.cast_type() {
                DataType::Timestamp(..) => shape(c.expr(), column),
                _ => Shape::Other,
            };
        }
        if let Some(b) = expr.downcast_ref::<BinaryExpr>() {
            let (left, right) = (shape(b.left(), column), shape(b.right(), column));
            return match (b.op(), left, right) {
                (_, Shape::Constant, Shape::Constant) => Shape::Constant,
                (Operator::Plus | Operator::Minus, Shape::Increasing, Shape::Constant)
                | (Operator::Plus, Shape::Constant, Shape::Increasing) => Shape::Increasing,
                _ => Shape::Other,
            };
        }
        Shape::Other
    }
    shape(expr, column) == Shape::Increasing
}

#[cfg(test)]
mod tests {
    use arrow::array::Int64Array;
    use arrow::datatypes::{Field, Schema};
    use datafusion::prelude::SessionContext;

    use super::*;

    fn schema() -> Arc<Schema> {
        Arc::new(Schema::new(vec![
            Field::new("k", DataType::Int64, true),
            Field::new("ts", DataType::Timestamp(TimeUnit::Millisecond, None), true),
        ]))
    }

    fn physical(sql: &str) -> Result<Arc<dyn PhysicalExpr>> {
        let schema = schema();
        let ctx = SessionContext::new();
        let df_schema = DFSchema::try_from(schema.as_ref().clone())?;
        let expr = ctx.parse_sql_expr(sql, &df_schema)?;
        Ok(ctx.create_physical_expr(expr, &df_schema)?)
    }

    #[test]
    fn watermark_expressions_that_only_shift_the_time_are_monotone() -> Result<()> {
        for sql in [
            "ts",
            "ts - INTERVAL '5' SECOND",
            "ts + INTERVAL '1' MINUTE",
            "CAST(ts AS TIMESTAMP) - INTERVAL '1' SECOND",
        ] {
            assert!(monotone_in(&physical(sql)?, 1), "{sql}");
        }
        for sql in [
            "CASE WHEN k > 0 THEN ts ELSE ts - INTERVAL '1' HOUR END",
            "ts - CAST(k AS TIMESTAMP)",
            "CAST(CAST(ts AS VARCHAR) AS TIMESTAMP)",
        ] {
            assert!(!monotone_in(&physical(sql)?, 1), "{sql}");
        }
        Ok(())
    }

    #[test]
    fn the_latest_row_gives_the_same_watermark_as_every_row() -> Result<()> {
        // Times out of order, with nulls, including a batch of nulls only.
        let times: Vec<Option<i64>> = (0..1000)
            .map(|i: i64| (i % 7 != 3).then_some((i * 7919) % 1000 * 1000))
            .collect();
        let batches = [times.clone(), vec![None, None], times[..1].to_vec()];
        for sql in ["ts", "ts - INTERVAL '5' SECOND"] {
            let expr = physical(sql)?;
            for times in &batches {
                let batch = RecordBatch::try_new(
                    schema(),
                    vec![
                        Arc::new(Int64Array::from_iter_values(0..times.len() as i64)),
                        Arc::new(arrow::array::TimestampMillisecondArray::from(times.clone())),
                    ],
                )?;
                assert_eq!(
                    max_watermark(&expr, &batch, Some(1))?,
                    max_watermark(&expr, &batch, None)?,
                    "{sql} over {} rows",
                    times.len()
                );
            }
        }
        Ok(())
    }

    #[test]
    fn a_replayed_seal_gives_the_blocks_of_the_first() -> Result<()> {
        let sql = "CREATE SOURCE s (k BIGINT, ts TIMESTAMP, \
            WATERMARK FOR ts AS ts - INTERVAL '1' SECOND) WITH (connector = 'generator', \
            rows_per_second = 3000, max_out_of_orderness = '3s', seed = 7)";
        let Ok(dstream_planner::Statement::CreateSource(create)) =
            dstream_planner::statement::parse_statement(sql)
        else {
            panic!("not a source: {sql}");
        };
        let ctx = SessionContext::new();
        let def = Arc::new(futures::executor::block_on(
            dstream_planner::definition::source_def(&ctx.state(), &create),
        )?);
        let timeline = Timeline::new(1_767_225_600_000_000_000, std::time::Duration::from_secs(1));
        let split = Split { index: 1, count: 2 };
        let mut live = SourceRuntime::open(def.clone(), &ctx, 500, split)?;
        let mut late = 0;
        for interval in (0..6).map(IntervalId) {
            let watermark = live.watermark();
            let first = live.seal(interval, &timeline)?;
            let again = SourceRuntime::replay(
                def.clone(),
                &ctx,
                500,
                split,
                interval,
                &timeline,
                watermark,
            )?;
            assert!(first.len() > 1, "several blocks per interval");
            assert_eq!(first.len(), again.len(), "interval {interval}");
            for (a, b) in first.iter().zip(&again) {
                assert_eq!(a.index, b.index);
                assert_eq!(
                    a.batches, b.batches,
                    "interval {interval} block {}",
                    a.index
                );
            }
            late = live.stats().late_rows;
        }
        assert!(late > 0, "the input should have had late rows to drop");
        Ok(())
    }
}
