//! Running a task: a DataFusion logical plan over in-memory record batches.
//!
//! Tasks never read shared mutable data: every input (an interval's block, a state
//! partition, shuffled partials) is bound into the plan as an immutable [`MemTable`],
//! which is what makes a task deterministic and safe to run again.

use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use datafusion::catalog::MemTable;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::datasource::provider_as_source;
use datafusion::logical_expr::{LogicalPlan, LogicalPlanBuilder};
use datafusion::prelude::SessionContext;

use crate::error::Result;

/// Executes `plan` and collects its output.
pub async fn execute(ctx: &SessionContext, plan: LogicalPlan) -> Result<Vec<RecordBatch>> {
    let batches = ctx.execute_logical_plan(plan).await?.collect().await?;
    Ok(batches.into_iter().filter(|b| b.num_rows() > 0).collect())
}

/// A plan that scans `batches` as table `name`.
pub fn scan(
    name: &str,
    schema: SchemaRef,
    batches: Vec<RecordBatch>,
) -> Result<LogicalPlanBuilder> {
    let table = MemTable::try_new(schema, vec![batches])?;
    Ok(LogicalPlanBuilder::scan(
        name,
        provider_as_source(Arc::new(table)),
        None,
    )?)
}

/// Rebinds every scan of table `name` in `plan` to read `batches` instead.
pub fn bind_scan(
    plan: &LogicalPlan,
    name: &str,
    schema: SchemaRef,
    batches: Vec<RecordBatch>,
) -> Result<LogicalPlan> {
    let source = provider_as_source(Arc::new(MemTable::try_new(schema, vec![batches])?));
    let bound = plan.clone().transform_up(|node| match node {
        LogicalPlan::TableScan(mut scan) if scan.table_name.table() == name => {
            scan.source = source.clone();
            Ok(Transformed::yes(LogicalPlan::TableScan(scan)))
        }
        other => Ok(Transformed::no(other)),
    })?;
    Ok(bound.data)
}
