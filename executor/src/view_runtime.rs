//! The runtime of one materialized view: its operator, its state partitions and its
//! view rows, advanced one interval at a time.
//!
//! [`ViewRuntime::run_interval`] instantiates the interval's stage DAG — one map task
//! per block, a shuffle, one reduce task per partition, tasks running in parallel — and
//! returns the new versions without installing them; [`ViewRuntime::commit`] installs
//! them. Until the commit, readers keep seeing the previous interval.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use datafusion::prelude::SessionContext;
use dstream_planner::{StreamPlan, WindowSpec};
use dstream_storage::{IntervalId, Timeline};
use tokio::task::JoinSet;

use crate::block::Block;
use crate::error::{Error, Result};
use crate::operator::{
    AggregateOperator, AppendOperator, Changelog, PartitionInput, ShufflePiece, StatePartition,
    StreamOperator, ViewUpdate,
};

/// The rows of one partition of a view.
pub type ViewPartition = Arc<Vec<RecordBatch>>;

/// A view's state and rows after some interval.
#[derive(Clone, Debug)]
pub struct ViewVersion {
    pub states: Vec<Arc<StatePartition>>,
    pub rows: Vec<ViewPartition>,
}

/// The outcome of one interval of one view, not yet visible.
#[derive(Debug)]
pub struct IntervalOutcome {
    pub interval: IntervalId,
    pub version: ViewVersion,
    pub changelog: Changelog,
    pub elapsed: Duration,
}

/// The operator that runs `plan`.
pub fn operator_for(plan: Arc<StreamPlan>) -> Result<Arc<dyn StreamOperator>> {
    Ok(match plan.aggregate {
        Some(_) => Arc::new(AggregateOperator::new(plan)?),
        None => Arc::new(AppendOperator::new(plan)),
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

/// One materialized view, live.
#[derive(Debug)]
pub struct ViewRuntime {
    plan: Arc<StreamPlan>,
    operator: Arc<dyn StreamOperator>,
    current: ViewVersion,
}

impl ViewRuntime {
    pub fn new(plan: Arc<StreamPlan>) -> Result<Self> {
        let operator = operator_for(plan.clone())?;
        let p = plan.partitions;
        Ok(ViewRuntime {
            current: ViewVersion {
                states: (0..p)
                    .map(|_| Arc::new(StatePartition::default()))
                    .collect(),
                rows: (0..p).map(|_| Arc::new(Vec::new())).collect(),
            },
            plan,
            operator,
        })
    }

    pub fn plan(&self) -> &Arc<StreamPlan> {
        &self.plan
    }

    /// The committed version.
    pub fn current(&self) -> &ViewVersion {
        &self.current
    }

    /// The watermark the view's window sees after `interval`: the interval's end for
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

    /// Runs the stage DAG of `interval` over `blocks`.
    pub async fn run_interval(
        &self,
        ctx: &SessionContext,
        interval: IntervalId,
        blocks: &[Arc<Block>],
        watermark: Option<i64>,
    ) -> Result<IntervalOutcome> {
        let started = Instant::now();
        let p = self.plan.partitions;

        // Stage 1: one map task per block.
        let mut maps = JoinSet::new();
        for (i, block) in blocks.iter().enumerate() {
            let (op, ctx, block) = (self.operator.clone(), ctx.clone(), block.clone());
            maps.spawn(async move { (i, op.map_block(&ctx, &block).await) });
        }
        let mut shuffled: Vec<Vec<(usize, ShufflePiece)>> = vec![Vec::new(); p];
        while let Some(joined) = maps.join_next().await {
            let (i, pieces) = joined.map_err(|e| Error::Internal(format!("map task: {e}")))?;
            for (part, piece) in pieces?.into_iter().enumerate() {
                shuffled[part].push((i, piece));
            }
        }

        // Stage 2: one reduce task per partition.
        let mut reduces = JoinSet::new();
        for (part, mut pieces) in shuffled.into_iter().enumerate() {
            pieces.sort_by_key(|(i, _)| *i);
            let input = PartitionInput {
                interval,
                state: self.current.states[part].clone(),
                pieces: pieces.into_iter().map(|(_, piece)| piece).collect(),
                watermark,
            };
            let (op, ctx) = (self.operator.clone(), ctx.clone());
            reduces.spawn(async move { (part, op.process_interval(&ctx, input).await) });
        }
        let mut version = self.current.clone();
        let mut changelogs: Vec<(usize, Changelog)> = Vec::with_capacity(p);
        while let Some(joined) = reduces.join_next().await {
            let (part, output) =
                joined.map_err(|e| Error::Internal(format!("reduce task: {e}")))?;
            let mut output = output?;
            output.view = match output.view {
                ViewUpdate::Replace(rows) => ViewUpdate::Replace(self.conform(rows)?),
                ViewUpdate::Append(rows) => ViewUpdate::Append(self.conform(rows)?),
            };
            output.changelog.deletes =
                self.conform(std::mem::take(&mut output.changelog.deletes))?;
            output.changelog.inserts =
                self.conform(std::mem::take(&mut output.changelog.inserts))?;
            version.states[part] = output.state;
            version.rows[part] = match output.view {
                ViewUpdate::Replace(rows) => Arc::new(rows),
                ViewUpdate::Append(rows) if rows.is_empty() => version.rows[part].clone(),
                ViewUpdate::Append(rows) => {
                    let mut all = version.rows[part].as_ref().clone();
                    all.extend(rows);
                    Arc::new(all)
                }
            };
            changelogs.push((part, output.changelog));
        }
        changelogs.sort_by_key(|(part, _)| *part);
        let mut changelog = Changelog::default();
        for (_, c) in changelogs {
            changelog.extend(c);
        }
        Ok(IntervalOutcome {
            interval,
            version,
            changelog,
            elapsed: started.elapsed(),
        })
    }

    fn conform(&self, rows: Vec<RecordBatch>) -> Result<Vec<RecordBatch>> {
        conform(&self.plan.schema, rows)
    }

    /// Installs the outcome of an interval.
    pub fn commit(&mut self, outcome: &IntervalOutcome) {
        self.current = outcome.version.clone();
    }
}
