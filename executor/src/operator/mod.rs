//! Stream operators: what a continuous query does at every interval.
//!
//! An operator runs in two stages per interval (see `dstream_planner::stage_dag`):
//! [`StreamOperator::map_block`] turns one input block into rows for each of the P
//! state partitions, and [`StreamOperator::process_interval`] folds one partition's
//! rows into that partition's state, producing the new state version, the partition's
//! view rows and its changelog. Both are deterministic functions of their inputs.

use std::fmt::Debug;
use std::sync::Arc;

use arrow::array::RecordBatch;
use async_trait::async_trait;
use datafusion::prelude::SessionContext;
use dstream_storage::IntervalId;

use crate::block::Block;
use crate::error::Result;

pub mod aggregate;
pub mod append;
pub mod changelog;
pub mod sliding;

pub use aggregate::AggregateOperator;
pub use append::AppendOperator;
pub use changelog::Changelog;

/// The map output of one block destined for one partition.
#[derive(Clone, Debug, Default)]
pub struct ShufflePiece {
    /// Partial aggregates (or, for stateless queries, output rows).
    pub rows: Vec<RecordBatch>,
    /// For each `count(DISTINCT ...)`: the distinct (keys, value) pairs seen.
    pub distinct: Vec<Vec<RecordBatch>>,
}

/// The immutable state of one partition of one query after some interval.
#[derive(Clone, Debug, Default)]
pub struct StatePartition {
    pub rows: Vec<RecordBatch>,
    pub distinct: Vec<Vec<RecordBatch>>,
    /// Sliding windows by add/subtract: the last emitted window's accumulators per
    /// group (window key columns NULL), and that window's end.
    pub running: Vec<RecordBatch>,
    pub emitted_until: Option<i64>,
    /// The watermark this version was computed with.
    pub watermark: Option<i64>,
}

impl StatePartition {
    /// Whether an interval with no new rows and watermark `watermark` leaves this
    /// partition unchanged: nothing was added and no window can have closed.
    pub fn unchanged_by(&self, watermark: Option<i64>) -> bool {
        watermark == self.watermark || (self.rows.is_empty() && self.running.is_empty())
    }
}

/// What one reduce task receives.
#[derive(Clone, Debug)]
pub struct PartitionInput {
    pub interval: IntervalId,
    pub state: Arc<StatePartition>,
    pub pieces: Vec<ShufflePiece>,
    /// The watermark after this interval, nanoseconds since the epoch, if the query's
    /// window has one.
    pub watermark: Option<i64>,
}

/// How an interval changes a partition's view rows.
#[derive(Clone, Debug)]
pub enum ViewUpdate {
    /// The partition's view rows are now exactly these.
    Replace(Vec<RecordBatch>),
    /// These rows are added to the partition's view rows.
    Append(Vec<RecordBatch>),
}

/// What one reduce task produces.
#[derive(Clone, Debug)]
pub struct PartitionOutput {
    pub state: Arc<StatePartition>,
    pub view: ViewUpdate,
    pub changelog: Changelog,
}

/// One continuous query's per-interval computation.
#[async_trait]
pub trait StreamOperator: Send + Sync + Debug {
    /// Map stage: runs the stateless part over `block` and splits the result by
    /// partition (one [`ShufflePiece`] per partition).
    async fn map_block(&self, ctx: &SessionContext, block: &Block) -> Result<Vec<ShufflePiece>>;

    /// Reduce stage: folds one partition's input for an interval into its state.
    async fn process_interval(
        &self,
        ctx: &SessionContext,
        input: PartitionInput,
    ) -> Result<PartitionOutput>;
}
