//! Installing catalog objects on a worker.
//!
//! The coordinator ships each object as its canonical `CREATE` statement (the text the
//! catalog file stores); the worker plans it with the same planner functions the
//! coordinator used, against the same settings, so both hold the same stream plan.
//! That statement text is dstream's serialized stage description: a task names a view
//! and a stage, and every worker knows the view's plan.

use std::sync::Arc;

use datafusion::catalog::MemTable;
use datafusion::prelude::SessionContext;
use datafusion::sql::sqlparser::ast;
use dstream_planner::catalog::{CatalogObject, TableDef, ViewDef};
use dstream_planner::definition::{columns_schema, source_def};
use dstream_planner::statement::parse_statement;
use dstream_planner::{Catalog, ConnectorSpec, ObjectKind, Statement, plan_dataflow};
use dstream_storage::Timeline;
use tracing::info;

use super::state::{Installed, InstalledView, WorkerState};
use crate::connector::Split;
use crate::error::{Error, Result};
use crate::ingest::SourceRuntime;
use crate::rpc::proto;
use crate::table::{file_table, table_options};
use crate::task::{planning_context, session_config};
use crate::view_runtime::operator_for;

/// Installs the objects of `request` that the worker does not know yet, and opens the
/// receivers placed on it.
pub async fn install(state: &WorkerState, request: proto::InstallRequest) -> Result<()> {
    let timeline = request
        .timeline
        .map(|t| Timeline {
            origin_nanos: t.origin_nanos,
            width_nanos: t.width_nanos.max(1),
        })
        .ok_or_else(|| Error::Internal("install without a timeline".into()))?;
    let mut guard = state.installed.lock().await;
    let installed = guard.get_or_insert_with(|| Installed {
        timeline,
        partitions: 1,
        block_rows: 1,
        retain_intervals: 1,
        catalog: Catalog::default(),
        tables: Default::default(),
        memory_tables: Default::default(),
        views: Default::default(),
    });
    // The settings of the newest request apply (SET batch_interval moves the timeline).
    installed.timeline = timeline;
    installed.partitions = request.partitions.max(1) as usize;
    installed.block_rows = request.block_rows.max(1) as usize;
    installed.retain_intervals = request.retain_intervals.max(1);
    if let Some(store) = &request.store {
        state.set_store(open_store(store, state.credentials())?);
    }
    for object in &request.objects {
        if installed.catalog.get(&object.name).is_some() {
            continue;
        }
        install_object(installed, object).await?;
    }
    let mut receivers = state.receivers.lock().await;
    for placed in &request.receivers {
        let key = (placed.source.clone(), placed.split);
        if receivers.contains_key(&key) {
            continue;
        }
        let def = installed
            .catalog
            .source(&placed.source)
            .cloned()
            .ok_or_else(|| {
                Error::Internal(format!("receiver for unknown source {}", placed.source))
            })?;
        let split = Split {
            index: placed.split,
            count: placed.splits.max(1),
        };
        let runtime = SourceRuntime::open(def, &state.task_ctx, installed.block_rows, split)?;
        info!(source = %placed.source, split = placed.split, splits = split.count, "opened receiver");
        receivers.insert(key, runtime);
    }
    Ok(())
}

/// Opens the object store the coordinator named, with this worker's own credentials.
fn open_store(
    store: &proto::Store,
    credentials: dstream_storage::S3Options,
) -> Result<dstream_storage::DataDir> {
    let nonempty = |s: &str| (!s.is_empty()).then(|| s.to_string());
    let config = dstream_storage::StoreConfig {
        url: store.url.clone(),
        s3: dstream_storage::S3Options {
            endpoint: nonempty(&store.s3_endpoint),
            region: nonempty(&store.s3_region),
            allow_http: store.s3_allow_http,
            ..credentials
        },
    };
    Ok(dstream_storage::DataDir::open(&config)?)
}

async fn install_object(installed: &mut Installed, object: &proto::CatalogObject) -> Result<()> {
    let ctx = SessionContext::new_with_config(session_config(installed.partitions));
    match (object.kind.as_str(), parse_statement(&object.sql)?) {
        ("source", Statement::CreateSource(create)) => {
            let def = source_def(&ctx.state(), &create).await?;
            installed
                .catalog
                .insert(CatalogObject::Source(Arc::new(def)))?;
        }
        ("table", Statement::Sql(stmt)) => {
            let ast::Statement::CreateTable(ct) = *stmt else {
                return Err(Error::Internal(format!("not a table: {}", object.sql)));
            };
            let schema = Arc::new(columns_schema(&ctx.state(), &ct.columns).await?);
            let options = table_options(&ct.table_options)?;
            let file = if options.is_empty() {
                let table = Arc::new(MemTable::try_new(schema.clone(), vec![vec![]])?);
                installed
                    .memory_tables
                    .insert(object.name.clone(), table.clone());
                installed.tables.insert(object.name.clone(), table);
                None
            } else {
                let spec = ConnectorSpec {
                    connector: options.get("connector").cloned().unwrap_or_default(),
                    options,
                };
                installed
                    .tables
                    .insert(object.name.clone(), file_table(&spec, schema.clone())?);
                Some(spec)
            };
            installed
                .catalog
                .insert(CatalogObject::Table(Arc::new(TableDef {
                    name: object.name.clone(),
                    schema,
                    file,
                    sql: object.sql.clone(),
                })))?;
        }
        ("view", Statement::CreateMaterializedView(create)) => {
            let planning = planning_context(
                session_config(installed.partitions),
                &installed.catalog,
                |name| installed.tables.get(name).cloned(),
            )?;
            let dataflow = plan_dataflow(
                &planning.state(),
                &installed.catalog,
                &create,
                installed.timeline.width(),
                installed.partitions,
            )
            .await?;
            // Every stage is installed under its own name: tasks name the stage.
            for stage in &dataflow.stages {
                installed.views.insert(
                    stage.name.clone(),
                    InstalledView {
                        plan: stage.clone(),
                        operators: operator_for(stage.clone())?,
                    },
                );
            }
            installed
                .catalog
                .insert(CatalogObject::View(Arc::new(ViewDef::new(
                    dataflow,
                    object.sql.clone(),
                )?)))?;
        }
        (kind, _) => {
            return Err(Error::Internal(format!(
                "cannot install {kind} from: {}",
                object.sql
            )));
        }
    }
    Ok(())
}

/// Forgets `name` (with all its stages, for a view) and whatever the worker held
/// for it.
pub async fn remove(state: &WorkerState, name: &str) -> Result<()> {
    let mut forget = vec![name.to_string()];
    if let Some(installed) = state.installed.lock().await.as_mut()
        && let Some(kind) = installed.catalog.get(name).map(|o| o.kind())
    {
        if let Some(CatalogObject::View(view)) = installed.catalog.get(name) {
            forget = view
                .dataflow
                .stages
                .iter()
                .map(|s| s.name.clone())
                .collect();
        }
        installed.catalog.remove(kind, name)?;
        installed.tables.remove(name);
        installed.memory_tables.remove(name);
        for stage in &forget {
            installed.views.remove(stage);
        }
        if kind == ObjectKind::Source {
            state
                .receivers
                .lock()
                .await
                .retain(|(source, _), _| source != name);
        }
    }
    for name in &forget {
        state.forget(name);
    }
    Ok(())
}
