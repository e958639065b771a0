//! What the catalog holds: SHOW SOURCES | TABLES | MATERIALIZED VIEWS and DESCRIBE.

use super::*;

pub(super) async fn show(engine: &Engine, kind: ShowKind) -> Result<StatementResult> {
    let state = engine.inner.state.lock().await;
    match kind {
        ShowKind::Sources => {
            let rows = state
                .sources
                .iter()
                .map(|(name, slot)| {
                    let stats = &slot.stats;
                    let def = &slot.def;
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
                .filter(|(_, slot)| !slot.is_inner_stage())
                .map(|(name, slot)| {
                    let plan = &slot.plan;
                    let rows: u64 = slot.partition_rows.iter().sum();
                    // What the view reads: the streams its stages read, not the
                    // stages themselves.
                    let reads: Vec<String> = state
                        .stages_of(name)
                        .iter()
                        .filter_map(|s| state.views.get(s))
                        .flat_map(|s| s.plan.inputs.clone())
                        .filter(|s| !s.contains(dstream_planner::dataflow::STAGE_SEPARATOR))
                        .collect();
                    vec![
                        name.clone(),
                        reads.join(", "),
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

pub(super) async fn describe(engine: &Engine, name: &str) -> Result<StatementResult> {
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
