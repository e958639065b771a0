//! Materialized views: CREATE MATERIALIZED VIEW and its EXPLAIN.

use super::*;

/// Compiles a view's query against the current catalog.
async fn plan(
    engine: &Engine,
    state: &EngineState,
    create: &CreateMaterializedView,
) -> Result<dstream_planner::StreamPlan> {
    let ctx = planning_context(engine, state)?;
    Ok(plan_view(
        &ctx.state(),
        &state.catalog,
        create,
        state.timeline.width(),
        engine.inner.config.partitions,
    )
    .await?)
}

pub(super) async fn create_view(
    engine: &Engine,
    create: CreateMaterializedView,
    persist: bool,
) -> Result<StatementResult> {
    let mut state = engine.inner.state.lock().await;
    if state.catalog.get(&create.name).is_some() && create.if_not_exists {
        return Ok(command("CREATE MATERIALIZED VIEW"));
    }
    state.catalog.check_free(&create.name)?;
    let plan = plan(engine, &state, &create).await?;
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

pub(super) async fn explain_view(
    engine: &Engine,
    create: CreateMaterializedView,
) -> Result<StatementResult> {
    let state = engine.inner.state.lock().await;
    let plan = plan(engine, &state, &create).await?;
    let rows = explain(&plan)
        .lines()
        .map(|l| vec![l.to_string()])
        .collect();
    text_rows(&["plan"], rows)
}
