//! Executing statements: the same code serves pgwire, the CLI (through pgwire) and
//! tests.
//!
//! [`execute`] parses a script and runs its statements in order. Definitions (`CREATE
//! SOURCE`, `CREATE TABLE`, `CREATE MATERIALIZED VIEW`, `DROP`) change the engine
//! state under its lock and are persisted to the catalog before they return; queries
//! read one committed [`crate::engine::Snapshot`] and never wait for an interval.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use arrow::array::{ArrayRef, RecordBatch, StringArray, UInt64Array};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::catalog::{MemTable, TableProvider};
use datafusion::common::TableReference;
use datafusion::common::{DFSchema, ParamValues};
use datafusion::datasource::file_format::FileFormat;
use datafusion::datasource::file_format::csv::CsvFormat;
use datafusion::datasource::file_format::json::JsonFormat;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::logical_expr::{DdlStatement, LogicalPlan};
use datafusion::prelude::SessionContext;
use datafusion::sql::parser::Statement as DFStatement;
use datafusion::sql::sqlparser::ast;
use dstream_executor::{SourceRuntime, ViewRuntime};
use dstream_planner::catalog::{
    CatalogObject, ConnectorSpec, SourceDef, TableDef, ViewDef, WatermarkDef,
};
use dstream_planner::duration::format_duration;
use dstream_planner::stage_dag::explain;
use dstream_planner::statement::{
    CreateMaterializedView, CreateSource, DropObject, ShowKind, normalize_ident, parse_statement,
    parse_statements,
};
use dstream_planner::stream_plan::plan_view;
use dstream_planner::{Catalog, INTERVAL_COLUMN, ObjectKind, Statement};
use dstream_storage::{CatalogEntry, CatalogState, EntryKind, table_data};
use tracing::info;

use crate::engine::{Engine, EngineState, SourceSlot, TableSlot, ViewSlot};
use crate::error::{Error, Result};
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

/// Executes every statement of `sql`, in order, stopping at the first error.
pub async fn execute(engine: &Engine, sql: &str) -> Result<Vec<StatementResult>> {
    let statements = parse_statements(sql)?;
    let mut results = Vec::with_capacity(statements.len());
    for statement in statements {
        results.push(execute_statement(engine, statement).await?);
    }
    Ok(results)
}

/// Executes one parsed statement.
pub async fn execute_statement(engine: &Engine, statement: Statement) -> Result<StatementResult> {
    match statement {
        Statement::CreateSource(create) => create_source(engine, *create, true).await,
        Statement::CreateMaterializedView(create) => create_view(engine, create, true).await,
        Statement::ExplainView(create) => explain_view(engine, create).await,
        Statement::Show(kind) => show(engine, kind).await,
        Statement::Describe(name) => describe(engine, &name).await,
        Statement::Drop(drop) => drop_object(engine, drop).await,
        Statement::SetBatchInterval(d) => set_batch_interval(engine, d).await,
        Statement::Advance(n) => advance(engine, n).await,
        Statement::Subscribe(name) => Ok(StatementResult::Subscribe(Subscription::start(
            engine, &name,
        )?)),
        Statement::Sql(stmt) => execute_sql(engine, *stmt).await,
    }
}

/// Re-creates one stored definition at startup.
pub(crate) async fn restore_entry(engine: &Engine, entry: &CatalogEntry) -> Result<()> {
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
            Arc::new(StringArray::from(
                rows.iter().map(|r| r[i].clone()).collect::<Vec<_>>(),
            )) as ArrayRef
        })
        .collect();
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
async fn persist_catalog(
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

/// The Arrow schema of column definitions, with DataFusion's SQL type mapping.
async fn columns_schema(ctx: &SessionContext, columns: &[ast::ColumnDef]) -> Result<Schema> {
    if columns.is_empty() {
        return Err(Error::InvalidDefinition(
            "at least one column is required".into(),
        ));
    }
    let cols = columns
        .iter()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let sql = format!("CREATE TABLE __columns ({cols})");
    let plan = ctx.state().create_logical_plan(&sql).await?;
    match plan {
        LogicalPlan::Ddl(DdlStatement::CreateMemoryTable(cmt)) => {
            Ok(cmt.input.schema().as_arrow().clone())
        }
        other => Err(Error::Internal(format!(
            "unexpected plan for columns: {other}"
        ))),
    }
}

/// A context with every source (as an empty table of its schema) and table
/// registered: what continuous queries are planned against.
fn planning_context(engine: &Engine, state: &EngineState) -> Result<SessionContext> {
    let ctx = SessionContext::new_with_config(engine.inner.session_config.clone());
    for obj in state.catalog.iter() {
        match obj {
            CatalogObject::Source(s) => {
                ctx.register_table(
                    TableReference::bare(s.name.as_str()),
                    Arc::new(MemTable::try_new(s.schema.clone(), vec![vec![]])?),
                )?;
            }
            CatalogObject::Table(t) => {
                if let Some(slot) = state.tables.get(&t.name) {
                    ctx.register_table(TableReference::bare(t.name.as_str()), slot.provider())?;
                }
            }
            CatalogObject::View(v) => {
                ctx.register_table(
                    TableReference::bare(v.name.as_str()),
                    Arc::new(MemTable::try_new(v.plan.schema.clone(), vec![vec![]])?),
                )?;
            }
        }
    }
    Ok(ctx)
}

async fn create_source(
    engine: &Engine,
    create: CreateSource,
    persist: bool,
) -> Result<StatementResult> {
    let mut state = engine.inner.state.lock().await;
    if state.catalog.get(&create.name).is_some() && create.if_not_exists {
        return Ok(command("CREATE SOURCE"));
    }
    state.catalog.check_free(&create.name)?;
    let ctx = SessionContext::new_with_config(engine.inner.session_config.clone());
    let record_schema = columns_schema(&ctx, &create.columns).await?;
    if record_schema.field_with_name(INTERVAL_COLUMN).is_ok() {
        return Err(Error::InvalidDefinition(format!(
            "column name {INTERVAL_COLUMN} is reserved: every source row gets it"
        )));
    }
    let mut fields: Vec<Field> = record_schema
        .fields()
        .iter()
        .map(|f| f.as_ref().clone())
        .collect();
    fields.push(Field::new(
        INTERVAL_COLUMN,
        DataType::Timestamp(TimeUnit::Nanosecond, None),
        false,
    ));
    let schema = Arc::new(Schema::new(fields));
    let watermark = match &create.watermark {
        None => None,
        Some(wm) => {
            let field = schema.field_with_name(&wm.column).map_err(|_| {
                Error::InvalidDefinition(format!(
                    "WATERMARK FOR {}: source \"{}\" has no such column",
                    wm.column, create.name
                ))
            })?;
            if !matches!(field.data_type(), DataType::Timestamp(_, _)) {
                return Err(Error::InvalidDefinition(format!(
                    "WATERMARK FOR {}: the column must be a TIMESTAMP, not {}",
                    wm.column,
                    field.data_type()
                )));
            }
            let df_schema = DFSchema::try_from(schema.as_ref().clone())?;
            let expr = ctx
                .state()
                .create_logical_expr(&wm.expr.to_string(), &df_schema)?;
            Some(WatermarkDef {
                column: wm.column.clone(),
                expr,
                sql: wm.expr.to_string(),
            })
        }
    };
    let connector = create.options.get("connector").cloned().ok_or_else(|| {
        Error::InvalidDefinition("CREATE SOURCE needs WITH (connector = '...'); available: generator, nexmark, tcp, file".into())
    })?;
    let def = Arc::new(SourceDef {
        name: create.name.clone(),
        schema,
        record_schema: Arc::new(record_schema),
        watermark,
        connector: ConnectorSpec {
            connector,
            options: create.options.clone(),
        },
        sql: create.to_string(),
    });
    let retain = (engine.inner.config.source_retention.as_nanos()
        / state.timeline.width().as_nanos().max(1)) as usize;
    let runtime = SourceRuntime::open(
        def.clone(),
        &engine.inner.task_ctx,
        retain,
        engine.inner.config.block_rows,
    )?;
    let mut catalog = state.catalog.clone();
    catalog.insert(CatalogObject::Source(def))?;
    if persist {
        persist_catalog(engine, &state, &catalog, &state.settings).await?;
        info!(source = %create.name, "created source");
    }
    state.catalog = catalog;
    state.sources.insert(
        create.name.clone(),
        SourceSlot {
            runtime,
            failure: None,
        },
    );
    engine.publish_snapshot(&state);
    Ok(command("CREATE SOURCE"))
}

async fn create_view(
    engine: &Engine,
    create: CreateMaterializedView,
    persist: bool,
) -> Result<StatementResult> {
    let mut state = engine.inner.state.lock().await;
    if state.catalog.get(&create.name).is_some() && create.if_not_exists {
        return Ok(command("CREATE MATERIALIZED VIEW"));
    }
    state.catalog.check_free(&create.name)?;
    let ctx = planning_context(engine, &state)?;
    let plan = plan_view(
        &ctx.state(),
        &state.catalog,
        &create,
        state.timeline.width(),
        engine.inner.config.partitions,
    )
    .await?;
    let plan = Arc::new(plan);
    let runtime = ViewRuntime::new(plan.clone())?;
    let mut catalog = state.catalog.clone();
    catalog.insert(CatalogObject::View(Arc::new(ViewDef {
        name: create.name.clone(),
        plan,
        sql: create.to_string(),
    })))?;
    if persist {
        persist_catalog(engine, &state, &catalog, &state.settings).await?;
        info!(view = %create.name, "created materialized view");
    }
    state.catalog = catalog;
    state.views.insert(
        create.name.clone(),
        ViewSlot {
            runtime,
            failure: None,
            last_interval: None,
        },
    );
    engine.publish_snapshot(&state);
    Ok(command("CREATE MATERIALIZED VIEW"))
}

async fn explain_view(engine: &Engine, create: CreateMaterializedView) -> Result<StatementResult> {
    let state = engine.inner.state.lock().await;
    let ctx = planning_context(engine, &state)?;
    let plan = plan_view(
        &ctx.state(),
        &state.catalog,
        &create,
        state.timeline.width(),
        engine.inner.config.partitions,
    )
    .await?;
    let rows = explain(&plan)
        .lines()
        .map(|l| vec![l.to_string()])
        .collect();
    text_rows(&["plan"], rows)
}

async fn create_table(
    engine: &Engine,
    ct: ast::CreateTable,
    persist: bool,
) -> Result<StatementResult> {
    let name = match ct.name.0.as_slice() {
        [ast::ObjectNamePart::Identifier(id)] => normalize_ident(id),
        _ => {
            return Err(Error::Unsupported(format!(
                "qualified table name {}; dstream has one schema",
                ct.name
            )));
        }
    };
    if ct.query.is_some() {
        return Err(Error::Unsupported(
            "CREATE TABLE ... AS SELECT; create the table, then INSERT INTO ... SELECT".into(),
        ));
    }
    let mut state = engine.inner.state.lock().await;
    if state.catalog.get(&name).is_some() && ct.if_not_exists {
        return Ok(command("CREATE TABLE"));
    }
    state.catalog.check_free(&name)?;
    let ctx = SessionContext::new_with_config(engine.inner.session_config.clone());
    let schema = Arc::new(columns_schema(&ctx, &ct.columns).await?);
    let options = table_options(&ct.table_options)?;
    let (slot, file) = if options.is_empty() {
        let stored = table_data::load_table(&engine.inner.data_dir, &name).await?;
        let rows = stored.unwrap_or_default();
        (
            TableSlot::Memory(Arc::new(MemTable::try_new(schema.clone(), vec![rows])?)),
            None,
        )
    } else {
        let spec = ConnectorSpec {
            connector: options.get("connector").cloned().unwrap_or_default(),
            options,
        };
        (
            TableSlot::File(file_table(&spec, schema.clone()).await?),
            Some(spec),
        )
    };
    let sql = ast::Statement::CreateTable(ct).to_string();
    let mut catalog = state.catalog.clone();
    catalog.insert(CatalogObject::Table(Arc::new(TableDef {
        name: name.clone(),
        schema,
        file,
        sql,
    })))?;
    if persist {
        persist_catalog(engine, &state, &catalog, &state.settings).await?;
        info!(table = %name, "created table");
    }
    state.catalog = catalog;
    state.tables.insert(name.clone(), slot);
    engine.publish_snapshot(&state);
    Ok(command("CREATE TABLE"))
}

fn table_options(options: &ast::CreateTableOptions) -> Result<BTreeMap<String, String>> {
    let list = match options {
        ast::CreateTableOptions::None => return Ok(BTreeMap::new()),
        ast::CreateTableOptions::With(list) => list,
        other => return Err(Error::Unsupported(format!("table options {other}"))),
    };
    let mut out = BTreeMap::new();
    for option in list {
        match option {
            ast::SqlOption::KeyValue { key, value } => {
                let value = match value {
                    ast::Expr::Value(v) => match &v.value {
                        ast::Value::SingleQuotedString(s) => s.clone(),
                        other => other.to_string(),
                    },
                    ast::Expr::Identifier(id) => id.value.clone(),
                    other => other.to_string(),
                };
                out.insert(key.value.to_ascii_lowercase(), value);
            }
            other => {
                return Err(Error::InvalidDefinition(format!(
                    "unexpected table option {other}"
                )));
            }
        }
    }
    Ok(out)
}

/// A table over the files of a directory (or one file).
async fn file_table(spec: &ConnectorSpec, schema: SchemaRef) -> Result<Arc<ListingTable>> {
    if spec.connector != "file" {
        return Err(Error::Invalid(format!(
            "tables support connector = 'file', not '{}'",
            spec.connector
        )));
    }
    let allowed = ["connector", "path", "format", "header"];
    if let Some(unknown) = spec.options.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(Error::Invalid(format!(
            "unknown option '{unknown}' for a file table; options are {}",
            allowed.join(", ")
        )));
    }
    let path = spec
        .options
        .get("path")
        .ok_or_else(|| Error::InvalidDefinition("a file table needs WITH (path = '...')".into()))?;
    let format_name = spec
        .options
        .get("format")
        .map(String::as_str)
        .unwrap_or("parquet");
    let header = spec
        .options
        .get("header")
        .map(|h| h != "false")
        .unwrap_or(true);
    let (format, extension): (Arc<dyn FileFormat>, &str) = match format_name {
        "parquet" => (Arc::new(ParquetFormat::default()), ".parquet"),
        "csv" => (
            Arc::new(CsvFormat::default().with_has_header(header)),
            ".csv",
        ),
        "json" => (Arc::new(JsonFormat::default()), ".json"),
        other => {
            return Err(Error::Invalid(format!(
                "unknown format '{other}'; use parquet, csv or json"
            )));
        }
    };
    let is_dir = std::path::Path::new(path).is_dir();
    if !is_dir && !std::path::Path::new(path).exists() {
        return Err(Error::InvalidDefinition(format!(
            "path '{path}' does not exist"
        )));
    }
    let url = if is_dir && !path.ends_with('/') {
        format!("{path}/")
    } else {
        path.clone()
    };
    let url = ListingTableUrl::parse(&url)?;
    let mut options = ListingOptions::new(format);
    if is_dir {
        options = options.with_file_extension(extension);
    } else {
        options = options.with_file_extension("");
    }
    let config = ListingTableConfig::new(url)
        .with_listing_options(options)
        .with_schema(schema);
    Ok(Arc::new(ListingTable::try_new(config)?))
}

async fn show(engine: &Engine, kind: ShowKind) -> Result<StatementResult> {
    let state = engine.inner.state.lock().await;
    match kind {
        ShowKind::Sources => {
            let rows = state
                .sources
                .iter()
                .map(|(name, slot)| {
                    let stats = slot.runtime.stats();
                    let def = slot.runtime.def();
                    vec![
                        name.clone(),
                        def.connector.connector.clone(),
                        stats.receiver.records.to_string(),
                        stats.receiver.malformed.to_string(),
                        stats.late_rows.to_string(),
                        stats.watermark.map(format_timestamp).unwrap_or_default(),
                        match &slot.failure {
                            Some(f) => format!("failed: {f}"),
                            None => "running".into(),
                        },
                    ]
                })
                .collect();
            text_rows(
                &[
                    "name",
                    "connector",
                    "records",
                    "malformed",
                    "late",
                    "watermark",
                    "status",
                ],
                rows,
            )
        }
        ShowKind::Tables => {
            let rows = state
                .catalog
                .list(ObjectKind::Table)
                .into_iter()
                .map(|obj| {
                    let kind = match state.tables.get(obj.name()) {
                        Some(TableSlot::File(_)) => "file",
                        _ => "memory",
                    };
                    vec![obj.name().to_string(), kind.to_string()]
                })
                .collect();
            text_rows(&["name", "kind"], rows)
        }
        ShowKind::MaterializedViews => {
            let rows = state
                .views
                .iter()
                .map(|(name, slot)| {
                    let plan = slot.runtime.plan();
                    let rows: usize = slot
                        .runtime
                        .current()
                        .rows
                        .iter()
                        .flat_map(|p| p.iter())
                        .map(|b| b.num_rows())
                        .sum();
                    vec![
                        name.clone(),
                        plan.source.clone(),
                        plan.emit.to_string(),
                        rows.to_string(),
                        slot.last_interval
                            .map(|i| i.0.to_string())
                            .unwrap_or_default(),
                        match &slot.failure {
                            Some(f) => format!("failed: {f}"),
                            None => "running".into(),
                        },
                    ]
                })
                .collect();
            text_rows(
                &["name", "source", "emit", "rows", "last_interval", "status"],
                rows,
            )
        }
    }
}

/// `2026-11-24 21:00:05.250`-style text of nanoseconds since the epoch.
pub fn format_timestamp(nanos: i64) -> String {
    chrono::DateTime::from_timestamp_nanos(nanos)
        .naive_utc()
        .format("%Y-%m-%d %H:%M:%S%.f")
        .to_string()
}

async fn describe(engine: &Engine, name: &str) -> Result<StatementResult> {
    let state = engine.inner.state.lock().await;
    let obj = state
        .catalog
        .get(name)
        .ok_or_else(|| Error::UnknownObject {
            kind: "relation",
            name: name.to_string(),
        })?;
    let watermark = match obj {
        CatalogObject::Source(s) => s.watermark.clone(),
        _ => None,
    };
    let rows = obj
        .schema()
        .fields()
        .iter()
        .map(|f| {
            let mut note = String::new();
            if let Some(wm) = watermark.as_ref().filter(|w| &w.column == f.name()) {
                note = format!("watermark: {}", wm.sql);
            }
            if f.name() == INTERVAL_COLUMN && obj.kind() == ObjectKind::Source {
                note = "start of the arrival interval".into();
            }
            vec![
                f.name().clone(),
                sql_type_name(f.data_type()),
                if f.is_nullable() { "YES" } else { "NO" }.to_string(),
                note,
            ]
        })
        .collect();
    text_rows(
        &["column_name", "data_type", "is_nullable", "comment"],
        rows,
    )
}

/// The SQL name of an Arrow type, as users declare it.
pub fn sql_type_name(t: &DataType) -> String {
    match t {
        DataType::Boolean => "BOOLEAN".into(),
        DataType::Int16 => "SMALLINT".into(),
        DataType::Int32 => "INTEGER".into(),
        DataType::Int64 => "BIGINT".into(),
        DataType::Float32 => "REAL".into(),
        DataType::Float64 => "DOUBLE".into(),
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => "TEXT".into(),
        DataType::Timestamp(_, None) => "TIMESTAMP".into(),
        DataType::Timestamp(_, Some(_)) => "TIMESTAMPTZ".into(),
        DataType::Date32 => "DATE".into(),
        DataType::Decimal128(p, s) => format!("DECIMAL({p},{s})"),
        other => other.to_string(),
    }
}

async fn drop_object(engine: &Engine, drop: DropObject) -> Result<StatementResult> {
    let mut state = engine.inner.state.lock().await;
    let tag = format!("DROP {}", drop.kind.as_str().to_ascii_uppercase());
    if state.catalog.get(&drop.name).is_none()
        && let Some(at) = state
            .unrestored
            .iter()
            .position(|(e, _)| e.name == drop.name)
    {
        // A definition that could not be restored at startup.
        let removed = state.unrestored.remove(at);
        if let Err(e) = persist_catalog(engine, &state, &state.catalog, &state.settings).await {
            state.unrestored.insert(at, removed);
            return Err(e);
        }
        return Ok(command(&tag));
    }
    if drop.if_exists && state.catalog.get(&drop.name).is_none() {
        return Ok(command(&tag));
    }
    let mut catalog = state.catalog.clone();
    catalog.remove(drop.kind, &drop.name)?;
    persist_catalog(engine, &state, &catalog, &state.settings).await?;
    state.catalog = catalog;
    match drop.kind {
        ObjectKind::Source => {
            state.sources.remove(&drop.name);
        }
        ObjectKind::Table => {
            if let Some(TableSlot::Memory(_)) = state.tables.remove(&drop.name) {
                table_data::drop_table(&engine.inner.data_dir, &drop.name).await?;
            }
        }
        ObjectKind::MaterializedView => {
            state.views.remove(&drop.name);
            if let Ok(mut subs) = engine.inner.subscribers.lock() {
                subs.remove(&drop.name);
            }
        }
    }
    engine.publish_snapshot(&state);
    info!(name = %drop.name, kind = %drop.kind, "dropped");
    Ok(command(&tag))
}

async fn set_batch_interval(engine: &Engine, width: Duration) -> Result<StatementResult> {
    let mut state = engine.inner.state.lock().await;
    if !state.sources.is_empty() {
        return Err(Error::Invalid(
            "batch_interval can only change while no sources exist; drop them first".into(),
        ));
    }
    if width < Duration::from_millis(10) {
        return Err(Error::Invalid(
            "batch_interval must be at least 10ms".into(),
        ));
    }
    let mut settings = state.settings.clone();
    settings.insert("batch_interval".into(), format_duration(width));
    persist_catalog(engine, &state, &state.catalog, &settings).await?;
    state.settings = settings;
    let origin = state.timeline.start_nanos(state.next);
    state.timeline = dstream_storage::Timeline::new(origin, width);
    state.next = dstream_storage::IntervalId(0);
    Ok(command("SET"))
}

async fn advance(engine: &Engine, n: u64) -> Result<StatementResult> {
    let Some(manual) = engine.clock().as_manual() else {
        return Err(Error::Invalid(
            "ADVANCE needs the manual clock; start the server with --clock manual".into(),
        ));
    };
    let target = engine.committed_intervals() + n;
    manual.advance(n);
    engine.wait_committed(target).await?;
    Ok(command(&format!("ADVANCE {n}")))
}

async fn execute_sql(engine: &Engine, stmt: ast::Statement) -> Result<StatementResult> {
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
async fn query(engine: &Engine, stmt: ast::Statement) -> Result<StatementResult> {
    query_with_params(engine, stmt, None).await
}

/// Plans a query against `ctx`, refusing statements that are not reads.
async fn plan_query(ctx: &SessionContext, stmt: ast::Statement) -> Result<LogicalPlan> {
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
fn check_not_failed(plan: &LogicalPlan, snapshot: &crate::engine::Snapshot) -> Result<()> {
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

/// Runs a query, binding `$n` placeholders to `params`.
pub async fn query_with_params(
    engine: &Engine,
    stmt: ast::Statement,
    params: Option<ParamValues>,
) -> Result<StatementResult> {
    let snapshot = engine.snapshot();
    let ctx = engine.query_context(&snapshot)?;
    let mut plan = plan_query(&ctx, stmt).await?;
    check_not_failed(&plan, &snapshot)?;
    if let Some(params) = params {
        plan = plan.with_param_values(params)?;
    }
    let df = ctx.execute_logical_plan(plan).await?;
    let schema = Arc::new(df.schema().as_arrow().clone());
    let batches = df.collect().await?;
    Ok(StatementResult::Rows { schema, batches })
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
        out[i - 1] = t;
    }
    Ok((Arc::new(plan.schema().as_arrow().clone()), out))
}

async fn insert_into(engine: &Engine, insert: ast::Insert) -> Result<StatementResult> {
    let name = match &insert.table {
        ast::TableObject::TableName(name) => match name.0.as_slice() {
            [ast::ObjectNamePart::Identifier(id)] => normalize_ident(id),
            _ => return Err(Error::Unsupported(format!("qualified name {name}"))),
        },
        other => return Err(Error::Unsupported(format!("INSERT INTO {other}"))),
    };
    // Inserts into one table are serialized by the engine lock, so the rows persisted
    // are exactly the table's rows.
    let state = engine.inner.state.lock().await;
    let table = match (state.catalog.get(&name), state.tables.get(&name)) {
        (Some(CatalogObject::Table(_)), Some(TableSlot::Memory(m))) => m.clone(),
        (Some(CatalogObject::Table(_)), _) => {
            return Err(Error::Invalid(format!(
                "table \"{name}\" is backed by files; add files to its directory instead"
            )));
        }
        (Some(obj), _) => {
            return Err(Error::Invalid(format!(
                "cannot INSERT into {} \"{name}\"; only tables take INSERT",
                obj.kind()
            )));
        }
        (None, _) => {
            return Err(Error::UnknownObject {
                kind: "table",
                name,
            });
        }
    };
    let snapshot = engine.snapshot();
    let ctx = engine.query_context(&snapshot)?;
    let plan = ctx
        .state()
        .statement_to_plan(DFStatement::Statement(Box::new(ast::Statement::Insert(
            insert,
        ))))
        .await?;
    let batches = ctx.execute_logical_plan(plan).await?.collect().await?;
    let count = batches
        .first()
        .and_then(|b| b.column(0).as_any().downcast_ref::<UInt64Array>())
        .map(|a| a.value(0))
        .unwrap_or(0);
    let mut rows = Vec::new();
    for partition in &table.batches {
        rows.extend(partition.read().await.iter().cloned());
    }
    table_data::store_table(&engine.inner.data_dir, &name, &table.schema(), &rows).await?;
    drop(state);
    Ok(StatementResult::Command {
        tag: "INSERT".into(),
        rows: Some(count),
    })
}
