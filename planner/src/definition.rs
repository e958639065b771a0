//! Definitions from statements: the column schema of `CREATE SOURCE`/`CREATE TABLE`
//! and the [`SourceDef`] of a `CREATE SOURCE`.
//!
//! The coordinator and every worker build definitions with these same functions from
//! the same statement text, so they agree on schemas and watermarks.

use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use datafusion::common::DFSchema;
use datafusion::execution::SessionState;
use datafusion::logical_expr::{DdlStatement, LogicalPlan};
use datafusion::sql::sqlparser::ast;

use crate::catalog::{ConnectorSpec, SourceDef, WatermarkDef};
use crate::error::{Error, Result};
use crate::statement::CreateSource;
use crate::window::INTERVAL_COLUMN;

/// The Arrow schema of column definitions, with DataFusion's SQL type mapping.
pub async fn columns_schema(state: &SessionState, columns: &[ast::ColumnDef]) -> Result<Schema> {
    if columns.is_empty() {
        return Err(Error::InvalidDefinition(
            "at least one column is required".into(),
        ));
    }
    let cols = columns
        .iter()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let sql = format!("CREATE TABLE __columns ({cols})");
    match state.create_logical_plan(&sql).await? {
        LogicalPlan::Ddl(DdlStatement::CreateMemoryTable(cmt)) => {
            Ok(cmt.input.schema().as_arrow().clone())
        }
        other => Err(Error::Internal(format!(
            "unexpected plan for columns: {other}"
        ))),
    }
}

/// The definition of a source: its declared columns plus `_interval`, its watermark
/// and its connector.
pub async fn source_def(state: &SessionState, create: &CreateSource) -> Result<SourceDef> {
    let record_schema = columns_schema(state, &create.columns).await?;
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
            let expr = state.create_logical_expr(&wm.expr.to_string(), &df_schema)?;
            Some(WatermarkDef {
                column: wm.column.clone(),
                expr,
                sql: wm.expr.to_string(),
            })
        }
    };
    let connector = create.options.get("connector").cloned().ok_or_else(|| {
        Error::InvalidDefinition(
            "CREATE SOURCE needs WITH (connector = '...'); available: generator, nexmark, tcp, file"
                .into(),
        )
    })?;
    Ok(SourceDef {
        name: create.name.clone(),
        schema,
        record_schema: Arc::new(record_schema),
        watermark,
        connector: ConnectorSpec {
            connector,
            options: create.options.clone(),
        },
        sql: create.to_string(),
    })
}
