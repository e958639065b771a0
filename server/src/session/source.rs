//! CREATE SOURCE: checking a source definition and opening its receiver.

use super::*;

pub(super) async fn create_source(
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
    let def = Arc::new(dstream_planner::definition::source_def(&ctx.state(), &create).await?);
    let retention = engine.inner.config.source_retention.as_nanos();
    let retain = retention
        .checked_div(state.timeline.width().as_nanos())
        .unwrap_or(retention) as usize;
    let name = create.name.clone();
    let mut catalog = state.catalog.clone();
    catalog.insert(CatalogObject::Source(def.clone()))?;
    let previous = std::mem::replace(&mut state.catalog, catalog);
    let mut slot = SourceSlot::new(def, retain);
    // A new source is sealed from the next interval on (a restored one: see
    // `restore_entry`).
    slot.since = persist.then_some(state.next);
    state.sources.insert(name.clone(), slot);
    // Opening the receiver on its worker checks the connector's options.
    install_or_undo(engine, &mut state, &name, previous, persist).await?;
    if persist {
        info!(source = %name, "created source");
    }
    engine.publish_snapshot(&state);
    Ok(command("CREATE SOURCE"))
}
