//! The stateless operator: filters, projections and joins with tables. Its view is
//! append-only: every output row of every interval is added to it.

use std::sync::Arc;

use async_trait::async_trait;
use datafusion::prelude::SessionContext;
use dstream_planner::StreamPlan;

use crate::block::Block;
use crate::error::{Error, Result};
use crate::operator::{
    Changelog, MapOperator, PartitionInput, PartitionOutput, ShufflePiece, StreamOperator,
    ViewUpdate,
};
use crate::shuffle::Wanted;
use crate::task::{bind_scan, execute};

/// Runs a stateless stream plan.
#[derive(Debug)]
pub struct AppendOperator {
    plan: Arc<StreamPlan>,
}

impl AppendOperator {
    pub fn new(plan: Arc<StreamPlan>) -> Self {
        AppendOperator { plan }
    }
}

#[async_trait]
impl MapOperator for AppendOperator {
    async fn map_block(
        &self,
        ctx: &SessionContext,
        block: &Block,
        wanted: &Wanted,
    ) -> Result<Vec<ShufflePiece>> {
        // Output rows need no shuffle: they stay with the partition of their block.
        let mut pieces = vec![ShufflePiece::default(); self.plan.partitions];
        let home = (block.interval.0 as usize)
            .wrapping_add(block.index)
            .checked_rem(self.plan.partitions)
            .ok_or_else(|| Error::Internal("a view without partitions".into()))?;
        if !wanted.contains(home) {
            return Ok(pieces);
        }
        let plan = bind_scan(
            &self.plan.input,
            &block.source,
            block.schema.clone(),
            block.batches.clone(),
        )?;
        let rows = execute(ctx, plan).await?;
        let piece = pieces
            .get_mut(home)
            .ok_or_else(|| Error::Internal("a view without partitions".into()))?;
        piece.rows = rows;
        Ok(pieces)
    }
}

#[async_trait]
impl StreamOperator for AppendOperator {
    async fn process_interval(
        &self,
        _ctx: &SessionContext,
        input: PartitionInput,
    ) -> Result<PartitionOutput> {
        let rows: Vec<_> = input.pieces.into_iter().flat_map(|p| p.rows).collect();
        Ok(PartitionOutput {
            state: input.state,
            view: ViewUpdate::Append(rows.clone()),
            changelog: Changelog {
                deletes: vec![],
                inserts: rows,
            },
        })
    }
}
