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
