//! Executing statements: the same code serves pgwire, the CLI (through pgwire) and
//! tests.
//!
//! [`execute`] parses a script and runs its statements in order. Definitions (`CREATE
//! SOURCE`, `CREATE TABLE`, `CREATE MATERIALIZED VIEW`, `DROP`) change the engine
//! state under its lock and are persisted to the catalog before they return; queries
//! read one committed [`crate::engine::Snapshot`] and never wait for an interval.
//!
//! One file per family of statements: [`source`], [`table`] (CREATE TABLE, INSERT),
//! [`view`] (CREATE MATERIALIZED VIEW, its EXPLAIN), [`listing`] (SHOW, DESCRIBE),
//! [`drop`], [`settings`] (SET batch_interval, ADVANCE) and [`query`] (ad-hoc queries
//! and pass-through SQL).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use arrow::array::{ArrayRef, RecordBatch, StringArray, UInt64Array};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::catalog::{MemTable, TableProvider};
use datafusion::common::ParamValues;
use datafusion::logical_expr::LogicalPlan;
use datafusion::prelude::SessionContext;
use datafusion::sql::parser::Statement as DFStatement;
use datafusion::sql::sqlparser::ast;
use dstream_planner::catalog::{CatalogObject, ConnectorSpec, TableDef, ViewDef};
use dstream_planner::definition::columns_schema;
use dstream_planner::duration::format_duration;
use dstream_planner::limits::parse_statements_within;
use dstream_planner::plan_dataflow;
use dstream_planner::stage_dag::explain;
use dstream_planner::statement::{
    CreateMaterializedView, CreateSource, DropObject, ShowKind, normalize_ident, parse_statement,
};
use dstream_planner::{Catalog, INTERVAL_COLUMN, ObjectKind, Statement};
use dstream_storage::{CatalogEntry, CatalogState, EntryKind, table_data};
use tracing::info;

use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::state::{EngineState, SourceSlot, TableSlot, ViewSlot};
use crate::subscribe::Subscription;

/// The result of one statement.
#[derive(Debug)]
pub enum StatementResult {
    /// Rows, for queries, SHOW, DESCRIBE and EXPLAIN.
    Rows {
        schema: SchemaRef,
        batches: Vec<RecordBatch>,
    },
    /// A command that returns no rows, with its tag (`CREATE SOURCE`, `INSERT`, ...)
    /// and, for `INSERT`, the number of rows.
    Command { tag: String, rows: Option<u64> },
    /// A live changelog stream.
    Subscribe(Subscription),
}

mod drop;
mod listing;
mod query;
mod settings;
mod source;
mod table;
mod view;

pub use listing::{format_timestamp, sql_type_name};
pub use query::{describe_query, query_with_params};

use drop::drop_object;
use listing::{describe, show};
use query::execute_sql;
use settings::{advance, set_batch_interval};
use source::create_source;
use table::{create_table, insert_into};
use view::{create_view, explain_view};

/// Executes every statement of `sql`, in order, stopping at the first error.
pub async fn execute(engine: &Engine, sql: &str) -> Result<Vec<StatementResult>> {
    let statements = parse(engine, sql).await?;
    let mut results = Vec::with_capacity(statements.len());
    for statement in statements {
        results.push(execute_statement(engine, statement).await?);
    }
    Ok(results)
}

/// Parses a script under the server's [`StatementLimits`](dstream_planner::StatementLimits),
/// on the statement threads: a statement too big or too deep is refused with
/// SQLSTATE `54001` before anything recurses over it on a shallow stack.
pub async fn parse(engine: &Engine, sql: &str) -> Result<Vec<Statement>> {
    let limits = engine.inner.config.limits;
    limits.check_text(sql)?;
    let sql = sql.to_string();
    on_statement_threads(engine, async move {
        Ok(parse_statements_within(&sql, &limits)?)
    })
    .await
}

/// [`parse`] for exactly one statement (a trailing `;` is allowed).
pub async fn parse_one(engine: &Engine, sql: &str) -> Result<Statement> {
    let mut statements = parse(engine, sql).await?;
    match statements.len() {
        1 => Ok(statements.remove(0)),
        0 => Err(dstream_planner::Error::Syntax("empty statement".into()).into()),
        n => {
            Err(dstream_planner::Error::Syntax(format!("expected one statement, found {n}")).into())
        }
    }
}

/// Executes one parsed statement on the statement threads. A query is stopped when
/// it runs longer than `statement_timeout` (SQLSTATE `57014`) or when the caller
/// stops waiting (its client left); definitions, `INSERT` and `ADVANCE` run to their
/// end either way, so that none is left half applied.
pub async fn execute_statement(engine: &Engine, statement: Statement) -> Result<StatementResult> {
    let interruptible = interruptible(&statement);
    let statement_kind = match &statement {
        Statement::Sql(stmt)
            if matches!(
                stmt.as_ref(),
                ast::Statement::Query(_) | ast::Statement::Explain { .. }
            ) =>
        {
            StatementKind::Query
        }
        _ => StatementKind::Other,
    };
    let task_engine = engine.clone();
    // Boxed where it runs: a statement's future is large, and the caller's stack (a
    // test's, a connection's) need not hold it.
    let work = async move { Box::pin(dispatch(&task_engine, statement)).await };
    if !interruptible {
        return engine.inner.statements.run_to_end(work).await?;
    }
    let pool = match &statement_kind {
        StatementKind::Query => &engine.inner.queries,
        StatementKind::Other => &engine.inner.statements,
    };
    let running = async { pool.run(work).await? };
    match engine.inner.config.statement_timeout {
        Some(limit) => tokio::time::timeout(limit, running)
            .await
            .map_err(|_| Error::StatementTimeout(format_duration(limit)))?,
        None => running.await,
    }
}

/// Which threads run a statement.
enum StatementKind {
    /// An ad-hoc query (`SELECT`, `EXPLAIN SELECT`): on the query threads.
    Query,
    /// Anything else: on the statement threads, never behind a busy query.
    Other,
}

/// Whether a statement only reads, so that stopping it half way changes nothing.
fn interruptible(statement: &Statement) -> bool {
    match statement {
        Statement::Show(_)
        | Statement::Describe(_)
        | Statement::ExplainView(_)
        | Statement::Subscribe(_) => true,
        Statement::Sql(stmt) => matches!(
            stmt.as_ref(),
            ast::Statement::Query(_) | ast::Statement::Explain { .. }
        ),
        Statement::CreateSource(_)
        | Statement::CreateMaterializedView(_)
        | Statement::Drop(_)
        | Statement::SetBatchInterval(_)
        | Statement::Advance(_) => false,
    }
}

/// Runs `work` on the engine's statement threads, whose stacks are deep enough for
/// any statement within the limits, whatever runtime the caller is on. Dropping the
/// returned future stops the work.
pub(crate) async fn on_statement_threads<T, F>(engine: &Engine, work: F) -> Result<T>
where
    F: std::future::Future<Output = Result<T>> + Send + 'static,
    T: Send + 'static,
{
    engine.inner.statements.run(work).await?
}

async fn dispatch(engine: &Engine, statement: Statement) -> Result<StatementResult> {
    match statement {
        Statement::CreateSource(create) => create_source(engine, *create, true).await,
        Statement::CreateMaterializedView(create) => create_view(engine, create, true).await,
        Statement::ExplainView(create) => explain_view(engine, create).await,
        Statement::Show(kind) => show(engine, kind).await,
        Statement::Describe(name) => describe(engine, &name).await,
        Statement::Drop(drop) => drop_object(engine, drop).await,
        Statement::SetBatchInterval(d) => set_batch_interval(engine, d).await,
        Statement::Advance(n) => advance(engine, n).await,
        Statement::Subscribe(name) => Ok(StatementResult::Subscribe(
            Subscription::start(engine, &name).await?,
        )),
        Statement::Sql(stmt) => execute_sql(engine, *stmt).await,
    }
}

/// Re-creates one stored definition at startup, on the statement threads.
pub(crate) async fn restore_entry(engine: &Engine, entry: &CatalogEntry) -> Result<()> {
    let (task_engine, task_entry) = (engine.clone(), entry.clone());
    on_statement_threads(engine, async move {
        Box::pin(restore(&task_engine, &task_entry)).await
    })
    .await
}

async fn restore(engine: &Engine, entry: &CatalogEntry) -> Result<()> {
    match parse_statement(&entry.sql)? {
        Statement::CreateSource(c) => create_source(engine, *c, false).await?,
        Statement::CreateMaterializedView(c) => create_view(engine, c, false).await?,
        Statement::Sql(stmt) => match *stmt {
            ast::Statement::CreateTable(ct) => create_table(engine, ct, false).await?,
            other => return Err(Error::Internal(format!("unexpected catalog entry {other}"))),
        },
        other => {
            return Err(Error::Internal(format!(
                "unexpected catalog entry {other:?}"
            )));
        }
    };
    let since = entry.since.map(dstream_storage::IntervalId);
    let mut state = engine.inner.state.lock().await;
    if let Some(source) = state.sources.get_mut(&entry.name) {
        source.since = since;
    }
    for stage in state.stages_of(&entry.name) {
        if let Some(view) = state.views.get_mut(&stage) {
            view.since = since;
        }
    }
    Ok(())
}

fn command(tag: &str) -> StatementResult {
    StatementResult::Command {
        tag: tag.to_string(),
        rows: None,
    }
}

/// Rows of text columns, for SHOW, DESCRIBE and EXPLAIN.
fn text_rows(columns: &[&str], rows: Vec<Vec<String>>) -> Result<StatementResult> {
    let schema = Arc::new(Schema::new(
        columns
            .iter()
            .map(|c| Field::new(*c, DataType::Utf8, true))
            .collect::<Vec<_>>(),
    ));
    let arrays: Vec<ArrayRef> = (0..columns.len())
        .map(|i| {
            let values = rows
                .iter()
                .map(|r| r.get(i).cloned())
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| Error::Internal(format!("a row without column {i}")))?;
            Ok(Arc::new(StringArray::from(values)) as ArrayRef)
        })
        .collect::<Result<_>>()?;
    let batch =
        RecordBatch::try_new(schema.clone(), arrays).map_err(|e| Error::Internal(e.to_string()))?;
    Ok(StatementResult::Rows {
        schema,
        batches: vec![batch],
    })
}

/// Writes the catalog file for `catalog` and `settings`. Statements call it with the
/// catalog as it will be *after* the change and apply the change only once it is
/// durable, so a failed write changes nothing.
pub(crate) async fn persist_catalog(
    engine: &Engine,
    state: &EngineState,
    catalog: &Catalog,
    settings: &BTreeMap<String, String>,
) -> Result<()> {
    let entries = catalog
        .iter()
        .map(|obj| CatalogEntry {
            name: obj.name().to_string(),
            kind: match obj.kind() {
                ObjectKind::Source => EntryKind::Source,
                ObjectKind::Table => EntryKind::Table,
                ObjectKind::MaterializedView => EntryKind::MaterializedView,
            },
            sql: obj.sql().to_string(),
            since: state
                .sources
                .get(obj.name())
                .and_then(|s| s.since)
                .or_else(|| state.views.get(obj.name()).and_then(|v| v.since))
                .map(|i| i.0),
        })
        .chain(state.unrestored.iter().map(|(entry, _)| entry.clone()))
        .collect();
    engine
        .inner
        .catalog_file
        .store(&CatalogState {
            entries,
            settings: settings.clone(),
        })
        .await?;
    Ok(())
}

/// Installs a new object (already in `state`) on the workers, then persists the
/// catalog if `persist`. On failure the object is taken out again — of `state`, with
/// `previous` as the catalog, and of the workers — and the error returned.
async fn install_or_undo(
    engine: &Engine,
    state: &mut EngineState,
    name: &str,
    previous: Catalog,
    persist: bool,
) -> Result<()> {
    state.catalog_version = state.catalog_version.saturating_add(1);
    let mut outcome = crate::cluster::scheduler::sync_workers(engine, state).await;
    if outcome.is_ok() && persist {
        outcome = persist_catalog(engine, state, &state.catalog, &state.settings).await;
    }
    if let Err(e) = outcome {
        state.catalog = previous;
        state.sources.remove(name);
        state.remove_view(name);
        state.tables.remove(name);
        state.catalog_version = state.catalog_version.saturating_add(1);
        crate::cluster::scheduler::remove_everywhere(engine, name).await;
        return Err(e);
    }
    Ok(())
}
