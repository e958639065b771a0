//! Ingest: turning what a receiver delivered into an interval's block.
//!
//! [`SourceRuntime`] owns a source's receiver and its watermark. Sealing interval *t*
//! adds the `_interval` column, drops rows behind the watermark of interval *t-1*
//! (counting them as late), and advances the watermark to the maximum of the watermark
//! expression over the interval's rows. Recent blocks are retained by whoever stores
//! them (the worker's block store), not here.

use std::sync::Arc;

use arrow::array::{
    Array, BooleanArray, Int64Array, RecordBatch, Scalar, TimestampNanosecondArray,
};
use arrow::compute::kernels::cmp::gt_eq;
use arrow::compute::{cast, filter_record_batch, is_null, or_kleene};
use arrow::datatypes::{DataType, TimeUnit};
use datafusion::common::DFSchema;
use datafusion::physical_expr::PhysicalExpr;
use datafusion::prelude::SessionContext;
use dstream_planner::SourceDef;
use dstream_storage::{IntervalId, Timeline};

use crate::block::{Block, cut_blocks, with_interval_column};
use crate::connector::{Receiver, ReceiverPosition, ReceiverStats, Split, open_receiver};
use crate::error::{Error, Result};

/// The live side of one source.
#[derive(Debug)]
pub struct SourceRuntime {
    def: Arc<SourceDef>,
    receiver: Box<dyn Receiver>,
    watermark_expr: Option<Arc<dyn PhysicalExpr>>,
    watermark_column: Option<usize>,
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
        let (watermark_expr, watermark_column) = match &def.watermark {
            Some(wm) => {
                let schema = DFSchema::try_from(def.schema.as_ref().clone())?;
                let expr = ctx.create_physical_expr(wm.expr.clone(), &schema)?;
                let column = def.schema.index_of(&wm.column)?;
                (Some(expr), Some(column))
            }
            None => (None, None),
        };
        Ok(SourceRuntime {
            def,
            receiver,
            watermark_expr,
            watermark_column,
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

    pub fn stats(&self) -> SourceStats {
        SourceStats {
            receiver: self.receiver.stats(),
            late_rows: self.late_rows,
            watermark: self.watermark,
        }
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
        let first = self.split.index as usize * BLOCKS_PER_SPLIT;
        Ok(cut_blocks(
            &self.def.name,
            interval,
            &self.def.schema,
            batches,
            self.block_rows,
        )
        .into_iter()
        .map(|mut block| {
            block.index += first;
            Arc::new(block)
        })
        .collect())
    }

    fn event_times(&self, batch: &RecordBatch, column: usize) -> Result<Arc<dyn Array>> {
        Ok(cast(
            batch.column(column),
            &DataType::Timestamp(TimeUnit::Nanosecond, None),
        )?)
    }

    fn drop_late(&mut self, batch: RecordBatch) -> Result<RecordBatch> {
        let (Some(column), Some(wm)) = (self.watermark_column, self.watermark) else {
            return Ok(batch);
        };
        let times = self.event_times(&batch, column)?;
        let bound = Scalar::new(TimestampNanosecondArray::from(vec![wm]));
        // A row without an event time is not late; it belongs to no window.
        let keep: BooleanArray = or_kleene(&gt_eq(&times, &bound)?, &is_null(&times)?)?;
        if keep.true_count() == batch.num_rows() {
            return Ok(batch);
        }
        let kept = filter_record_batch(&batch, &keep)?;
        self.late_rows += (batch.num_rows() - kept.num_rows()) as u64;
        Ok(kept)
    }

    fn advance_watermark(&mut self, batch: &RecordBatch) -> Result<()> {
        let Some(expr) = &self.watermark_expr else {
            return Ok(());
        };
        let values = expr.evaluate(batch)?.into_array(batch.num_rows())?;
        let nanos = cast(&values, &DataType::Timestamp(TimeUnit::Nanosecond, None))?;
        let nanos = cast(&nanos, &DataType::Int64)?;
        let nanos = nanos
            .as_any()
            .downcast_ref::<Int64Array>()
            .ok_or_else(|| Error::Internal("watermark cast did not give Int64".into()))?;
        if let Some(max) = arrow::compute::max(nanos) {
            self.watermark = Some(self.watermark.map_or(max, |w| w.max(max)));
        }
        Ok(())
    }
}
