//! Running a task: a DataFusion logical plan over in-memory record batches.
//!
//! Tasks never read shared mutable data: every input (an interval's block, a state
//! partition, shuffled partials) is bound into the plan as an immutable [`MemTable`],
//! which is what makes a task deterministic and safe to run again.

use std::sync::{Arc, Mutex};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use datafusion::catalog::{MemTable, TableProvider};
use datafusion::common::TableReference;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::datasource::provider_as_source;
use datafusion::logical_expr::{Expr, LogicalPlan, LogicalPlanBuilder, Volatility};
use datafusion::physical_plan::collect;
use datafusion::prelude::{SessionConfig, SessionContext};

use dstream_planner::{Catalog, CatalogObject};

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

/// A plan over named inputs, analyzed and optimized once and then run for every task
/// with that task's rows bound to its scans, so that a task pays only for physical
/// planning and execution. The logical optimizer never looks at a table's rows, so
/// the plan it makes over empty inputs is the plan it would make over any. Plans
/// that call a function which is not immutable (`now()` is folded to a constant by
/// the optimizer) are optimized for every run instead.
#[derive(Debug)]
pub struct PlanTemplate {
    plan: LogicalPlan,
    reusable: bool,
    optimized: Mutex<Option<LogicalPlan>>,
}

impl PlanTemplate {
    pub fn new(plan: LogicalPlan) -> Result<Self> {
        let reusable = !plan.exists(|node| {
            Ok(node.expressions().iter().any(|e| {
                e.exists(|e| {
                    Ok(matches!(e, Expr::ScalarFunction(f)
                        if f.func.signature().volatility != Volatility::Immutable))
                })
                .unwrap_or(true)
            }))
        })?;
        Ok(PlanTemplate {
            plan,
            reusable,
            optimized: Mutex::new(None),
        })
    }

    /// Runs the plan with `inputs` (table name, schema, rows) bound to its scans.
    pub async fn execute(
        &self,
        ctx: &SessionContext,
        inputs: Vec<(&str, SchemaRef, Vec<RecordBatch>)>,
    ) -> Result<Vec<RecordBatch>> {
        let state = ctx.state();
        let cached = self
            .optimized
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        let mut plan = match cached {
            Some(plan) => plan,
            None if self.reusable => {
                let plan = state.optimize(&self.plan)?;
                *self
                    .optimized
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(plan.clone());
                plan
            }
            None => self.plan.clone(),
        };
        for (name, schema, batches) in inputs {
            plan = bind_scan(&plan, name, schema, batches)?;
        }
        let physical = if self.reusable {
            state
                .query_planner()
                .create_physical_plan(&plan, &state)
                .await?
        } else {
            state.create_physical_plan(&plan).await?
        };
        let batches = collect(physical, ctx.task_ctx()).await?;
        Ok(batches.into_iter().filter(|b| b.num_rows() > 0).collect())
    }
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

/// A context with every object of `catalog` registered — sources and views as empty
/// tables of their schema, tables as `table` provides them: what continuous queries
/// are planned against, on the coordinator and on every worker alike.
pub fn planning_context(
    config: SessionConfig,
    catalog: &Catalog,
    table: impl Fn(&str) -> Option<Arc<dyn TableProvider>>,
) -> Result<SessionContext> {
    let ctx = SessionContext::new_with_config(config);
    for object in catalog.iter() {
        let name = TableReference::bare(object.name());
        match object {
            CatalogObject::Table(t) => {
                if let Some(provider) = table(&t.name) {
                    ctx.register_table(name, provider)?;
                }
            }
            other => {
                ctx.register_table(
                    name,
                    Arc::new(MemTable::try_new(other.schema(), vec![vec![]])?),
                )?;
            }
        }
    }
    Ok(ctx)
}
