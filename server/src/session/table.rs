//! Tables: CREATE TABLE (in memory or over files) and INSERT.

use super::*;

pub(super) async fn create_table(
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
    let schema = Arc::new(columns_schema(&ctx.state(), &ct.columns).await?);
    let options = dstream_executor::table::table_options(&ct.table_options)?;
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
            TableSlot::File(dstream_executor::table::file_table(&spec, schema.clone())?),
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
    let previous = std::mem::replace(&mut state.catalog, catalog);
    state.tables.insert(name.clone(), slot);
    install_or_undo(engine, &mut state, &name, previous, persist).await?;
    if persist {
        info!(table = %name, "created table");
    }
    engine.publish_snapshot(&state);
    Ok(command("CREATE TABLE"))
}

pub(super) async fn insert_into(engine: &Engine, insert: ast::Insert) -> Result<StatementResult> {
    let name = match &insert.table {
        ast::TableObject::TableName(name) => match name.0.as_slice() {
            [ast::ObjectNamePart::Identifier(id)] => normalize_ident(id),
            _ => return Err(Error::Unsupported(format!("qualified name {name}"))),
        },
        other => return Err(Error::Unsupported(format!("INSERT INTO {other}"))),
    };
    // Inserts into one table are serialized by the engine lock, so the rows persisted
    // are exactly the table's rows.
    let mut state = engine.inner.state.lock().await;
    // Map tasks join their block with the tables: maps started ahead with the old
    // rows are not used.
    state.mapped_ahead = None;
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
    let rows = crate::state::memory_rows(&table).await;
    table_data::store_table(&engine.inner.data_dir, &name, &table.schema(), &rows).await?;
    // Views that join the table see the new rows from the next interval on.
    crate::cluster::scheduler::push_table(engine, &name, &table).await?;
    drop(state);
    Ok(StatementResult::Command {
        tag: "INSERT".into(),
        rows: Some(count),
    })
}
