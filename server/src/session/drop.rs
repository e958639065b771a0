//! DROP SOURCE | TABLE | MATERIALIZED VIEW, including definitions that could not be
//! restored at startup.

use super::*;

pub(super) async fn drop_object(engine: &Engine, drop: DropObject) -> Result<StatementResult> {
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
    // With CASCADE, the views that read it go first, readers before what they read.
    let cascaded = if drop.cascade {
        catalog.dependents_deep(&drop.name)
    } else {
        Vec::new()
    };
    for view in &cascaded {
        catalog.remove(ObjectKind::MaterializedView, view)?;
    }
    catalog.remove(drop.kind, &drop.name)?;
    persist_catalog(engine, &state, &catalog, &state.settings).await?;
    state.catalog = catalog;
    for view in &cascaded {
        state.remove_view(view);
        engine.inner.changes.remove(view);
        crate::cluster::scheduler::remove_everywhere(engine, view).await;
        info!(name = %view, cascade = %drop.name, "dropped materialized view");
    }
    match drop.kind {
        ObjectKind::Source => {
            state.sources.remove(&drop.name);
            state.forget_seals(&drop.name);
        }
        ObjectKind::Table => {
            if let Some(TableSlot::Memory(_)) = state.tables.remove(&drop.name) {
                table_data::drop_table(&engine.inner.data_dir, &drop.name).await?;
            }
        }
        ObjectKind::MaterializedView => {
            state.remove_view(&drop.name);
            engine.inner.changes.remove(&drop.name);
        }
    }
    state.catalog_version = state.catalog_version.saturating_add(1);
    crate::cluster::scheduler::remove_everywhere(engine, &drop.name).await;
    engine.publish_snapshot(&state);
    info!(name = %drop.name, kind = %drop.kind, "dropped");
    Ok(command(&tag))
}
