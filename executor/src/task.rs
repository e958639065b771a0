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
use datafusion::prelude::{SessionConfig, SessionContext};

use crate::error::Result;

/// The DataFusion settings every dstream context uses.
pub fn session_config(partitions: usize) -> SessionConfig {
    let mut config = SessionConfig::new()
        .with_target_partitions(partitions.max(1))
        .with_information_schema(true)
        .with_default_catalog_and_schema("dstream", "public");
    let options = config.options_mut();
    options.sql_parser.dialect = datafusion::config::Dialect::PostgreSQL;
    // TEXT columns are plain Utf8, which every connector and the wire encoding handle.
    options.sql_parser.map_string_types_to_utf8view = false;
    config
}

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
