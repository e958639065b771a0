//! Ad-hoc queries over one committed snapshot, and the standard SQL statements
//! dstream passes through (SELECT, EXPLAIN, SET, SHOW variable, transactions).

use datafusion::error::DataFusionError;
use futures::StreamExt;

use super::*;

pub(super) async fn execute_sql(engine: &Engine, stmt: ast::Statement) -> Result<StatementResult> {
    match stmt {
        ast::Statement::Query(_) | ast::Statement::Explain { .. } => query(engine, stmt).await,
        ast::Statement::CreateTable(ct) => create_table(engine, ct, true).await,
        ast::Statement::Insert(insert) => insert_into(engine, insert).await,
        ast::Statement::StartTransaction { .. } => Ok(command("BEGIN")),
        ast::Statement::Commit { .. } => Ok(command("COMMIT")),
        ast::Statement::Rollback { .. } => Ok(command("ROLLBACK")),
        ast::Statement::Set(_) => Ok(command("SET")),
        ast::Statement::ShowVariable { variable } => {
            let name = variable
                .iter()
                .map(|i| i.value.to_ascii_lowercase())
                .collect::<Vec<_>>()
                .join(".");
            let value = match name.as_str() {
                "batch_interval" => {
                    format_duration(engine.inner.state.lock().await.timeline.width())
                }
                "partitions" => engine.config().partitions.to_string(),
                "clock" => if engine.clock().as_manual().is_some() {
                    "manual"
                } else {
                    "real"
                }
                .into(),
                "server_version" => "15.0 (dstream)".into(),
                "transaction_isolation" => "read committed".into(),
                "standard_conforming_strings" => "on".into(),
                _ => {
                    return Err(Error::Invalid(format!(
                        "unrecognized setting \"{name}\"; try batch_interval, partitions or clock"
                    )));
                }
            };
            text_rows(&[name.as_str()], vec![vec![value]])
        }
        ast::Statement::CreateView(_) => Err(Error::Unsupported(
            "CREATE VIEW; use CREATE MATERIALIZED VIEW for a continuous query".into(),
        )),
        ast::Statement::Update(_) | ast::Statement::Delete(_) => Err(Error::Unsupported(
            "UPDATE and DELETE; tables are append-only (drop and re-create a table to replace it)"
                .into(),
        )),
        ast::Statement::Drop { object_type, .. } => Err(Error::Unsupported(format!(
            "DROP {object_type}; use DROP SOURCE, DROP TABLE or DROP MATERIALIZED VIEW"
        ))),
        other => Err(Error::Unsupported(format!(
            "this statement: {}",
            other.to_string().chars().take(80).collect::<String>()
        ))),
    }
}

/// An ad-hoc query over one committed snapshot.
pub(super) async fn query(engine: &Engine, stmt: ast::Statement) -> Result<StatementResult> {
    query_with_params(engine, stmt, None).await
}

/// Plans a query against `ctx`, refusing statements that are not reads.
pub(super) async fn plan_query(ctx: &SessionContext, stmt: ast::Statement) -> Result<LogicalPlan> {
    let plan = ctx
        .state()
        .statement_to_plan(DFStatement::Statement(Box::new(stmt)))
        .await?;
    if matches!(
        plan,
        LogicalPlan::Dml(_)
            | LogicalPlan::Ddl(_)
            | LogicalPlan::Copy(_)
            | LogicalPlan::Statement(_)
    ) {
        return Err(Error::Unsupported(format!(
            "this statement in a query: {}",
            plan.display()
        )));
    }
    Ok(plan)
}

/// Refuses to read a view that failed: its rows stopped at some interval.
pub(super) fn check_not_failed(
    plan: &LogicalPlan,
    snapshot: &crate::engine::Snapshot,
) -> Result<()> {
    use datafusion::common::tree_node::TreeNodeRecursion;
    let mut failed = None;
    plan.apply_with_subqueries(|node| {
        if let LogicalPlan::TableScan(scan) = node
            && let Some(f) = snapshot.failed.get(scan.table_name.table())
        {
            failed = Some(crate::subscribe::failed_view(scan.table_name.table(), f));
            return Ok(TreeNodeRecursion::Stop);
        }
        Ok(TreeNodeRecursion::Continue)
    })?;
    match failed {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// How many times a query runs when the rows it read moved after its snapshot (a
/// speculative copy took a state partition over, say).
const READ_ATTEMPTS: u32 = 3;

/// Runs a query, binding `$n` placeholders to `params`. A query whose rows moved
/// between workers after its snapshot runs again over the next snapshot.
pub async fn query_with_params(
    engine: &Engine,
    stmt: ast::Statement,
    params: Option<ParamValues>,
) -> Result<StatementResult> {
    let mut attempt: u32 = 1;
    loop {
        let snapshot = engine.snapshot();
        match query_snapshot(engine, &snapshot, stmt.clone(), params.clone()).await {
            Err(Error::DataFusion(e))
                if attempt < READ_ATTEMPTS && crate::cluster::remote_table::read_moved(&e) =>
            {
                tracing::debug!(attempt, error = %e, "rows moved under a query; running it again");
                next_snapshot(engine, &snapshot).await;
                attempt = attempt.saturating_add(1);
            }
            result => return result,
        }
    }
}

/// Runs a query over `snapshot`.
async fn query_snapshot(
    engine: &Engine,
    snapshot: &crate::engine::Snapshot,
    stmt: ast::Statement,
    params: Option<ParamValues>,
) -> Result<StatementResult> {
    let ctx = engine.query_context(snapshot)?;
    let mut plan = plan_query(&ctx, stmt).await?;
    check_not_failed(&plan, snapshot)?;
    if let Some(params) = params {
        plan = plan.with_param_values(params)?;
    }
    let df = ctx.execute_logical_plan(plan).await?;
    let schema = Arc::new(df.schema().as_arrow().clone());
    let limit = engine.config().max_result_bytes;
    let over_memory = |e: DataFusionError| match e.find_root() {
        DataFusionError::ResourcesExhausted(why) => Error::OutOfMemory(format!(
            "the query needs more memory than {} (query_memory): {why}",
            format_bytes(engine.config().query_memory)
        )),
        _ => Error::DataFusion(e),
    };
    let mut stream = df.execute_stream().await.map_err(over_memory)?;
    let (mut batches, mut bytes) = (Vec::new(), 0usize);
    while let Some(batch) = stream.next().await {
        let batch = batch.map_err(over_memory)?;
        bytes = bytes.saturating_add(result_bytes(&batch));
        if bytes > limit {
            return Err(Error::OutOfMemory(format!(
                "the query's result is larger than {} (max_result_bytes); \
                 add a LIMIT, a WHERE or an aggregation",
                format_bytes(limit)
            )));
        }
        batches.push(batch);
    }
    Ok(StatementResult::Rows { schema, batches })
}

/// Waits, for a second at most, until a snapshot newer than `old` is published:
/// the commit that moved rows publishes one right after.
async fn next_snapshot(engine: &Engine, old: &Arc<crate::engine::Snapshot>) {
    let started = std::time::Instant::now();
    while Arc::ptr_eq(&engine.snapshot(), old) && started.elapsed() < Duration::from_secs(1) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The row schema and parameter types of a query, without running it.
pub async fn describe_query(
    engine: &Engine,
    stmt: ast::Statement,
) -> Result<(SchemaRef, Vec<Option<DataType>>)> {
    let snapshot = engine.snapshot();
    let ctx = engine.query_context(&snapshot)?;
    let plan = plan_query(&ctx, stmt).await?;
    let types = plan.get_parameter_types()?;
    let mut params: Vec<(usize, Option<DataType>)> = types
        .into_iter()
        .filter_map(|(name, t)| {
            name.trim_start_matches('$')
                .parse::<usize>()
                .ok()
                .map(|i| (i, t))
        })
        .collect();
    params.sort_by_key(|(i, _)| *i);
    let count = params.last().map(|(i, _)| *i).unwrap_or(0);
    let mut out = vec![None; count];
    for (i, t) in params {
        // `$0` is no parameter: DataFusion refuses it when the query runs.
        if let Some(slot) = i.checked_sub(1).and_then(|i| out.get_mut(i)) {
            *slot = t;
        }
    }
    Ok((Arc::new(plan.schema().as_arrow().clone()), out))
}

/// A size in bytes as the configuration writes it: `256MiB`, `1GiB`, `4096`.
pub(crate) fn format_bytes(bytes: usize) -> String {
    for (shift, unit) in [(30, "GiB"), (20, "MiB"), (10, "KiB")] {
        if bytes >= 1 << shift && bytes.is_multiple_of(1 << shift) {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    format!("{bytes} bytes")
}

/// The bytes of Arrow data a result batch holds: of its rows only, not of buffers it
/// shares with what it was sliced from.
fn result_bytes(batch: &RecordBatch) -> usize {
    batch
        .columns()
        .iter()
        .map(|c| {
            let data = c.to_data();
            data.get_slice_memory_size()
                .unwrap_or_else(|_| c.get_array_memory_size())
        })
        .fold(0, usize::saturating_add)
}
