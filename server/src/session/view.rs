//! Materialized views: CREATE MATERIALIZED VIEW and its EXPLAIN.

use super::*;

/// Compiles a view's query against the current catalog.
async fn plan(
    engine: &Engine,
    state: &EngineState,
    create: &CreateMaterializedView,
) -> Result<dstream_planner::StreamPlan> {
    let ctx = dstream_executor::task::planning_context(
        engine.inner.session_config.clone(),
        &state.catalog,
        |name| state.tables.get(name).map(|t| t.provider()),
    )?;
    let plan = plan_view(
        &ctx.state(),
        &state.catalog,
        create,
        state.timeline.width(),
        engine.inner.config.partitions,
    )
    .await?;
    if let Some(window) = &plan.window {
        engine
            .inner
            .config
            .limits
            .check_window(window, state.timeline.width())?;
    }
    Ok(plan)
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
    let mut catalog = state.catalog.clone();
    catalog.insert(CatalogObject::View(Arc::new(ViewDef {
        name: create.name.clone(),
        plan: plan.clone(),
        sql: create.to_string(),
    })))?;
    let previous = std::mem::replace(&mut state.catalog, catalog);
    let mut slot = ViewSlot::new(plan);
    // A new view starts with the next interval (a restored one: see `restore_entry`).
    slot.since = persist.then_some(state.next);
    state.views.insert(create.name.clone(), slot);
    install_or_undo(engine, &mut state, &create.name, previous, persist).await?;
    if persist {
        info!(view = %create.name, "created materialized view");
    }
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
