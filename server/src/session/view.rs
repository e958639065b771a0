//! Materialized views: CREATE MATERIALIZED VIEW and its EXPLAIN.

use super::*;

/// Compiles a view's query against the current catalog.
async fn plan(
    engine: &Engine,
    state: &EngineState,
    create: &CreateMaterializedView,
) -> Result<dstream_planner::Dataflow> {
    let ctx = dstream_executor::task::planning_context(
        engine.inner.session_config.clone(),
        &state.catalog,
        |name| state.tables.get(name).map(|t| t.provider()),
    )?;
    let dataflow = plan_dataflow(
        &ctx.state(),
        &state.catalog,
        create,
        state.timeline.width(),
        engine.inner.config.partitions,
    )
    .await?;
    for stage in &dataflow.stages {
        if let Some(window) = &stage.window {
            engine
                .inner
                .config
                .limits
                .check_window(window, state.timeline.width())?;
        }
    }
    Ok(dataflow)
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
    let dataflow = plan(engine, &state, &create).await?;
    let stages = dataflow.stages.clone();
    let mut catalog = state.catalog.clone();
    catalog.insert(CatalogObject::View(Arc::new(ViewDef::new(
        dataflow,
        create.to_string(),
    )?)))?;
    let previous = std::mem::replace(&mut state.catalog, catalog);
    // Every stage runs as a view of its own; the last is the view's.
    for stage in stages {
        let mut slot = ViewSlot::new(stage.clone());
        // A new view starts with the next interval (a restored one: see
        // `restore_entry`).
        slot.since = persist.then_some(state.next);
        state.views.insert(stage.name.clone(), slot);
    }
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
    let dataflow = plan(engine, &state, &create).await?;
    let rows = explain(&dataflow)
        .lines()
        .map(|l| vec![l.to_string()])
        .collect();
    text_rows(&["plan"], rows)
}
