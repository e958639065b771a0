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

pub(super) fn table_options(options: &ast::CreateTableOptions) -> Result<BTreeMap<String, String>> {
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
pub(super) async fn file_table(
    spec: &ConnectorSpec,
    schema: SchemaRef,
) -> Result<Arc<ListingTable>> {
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
