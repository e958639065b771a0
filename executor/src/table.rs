//! Tables: the options of `CREATE TABLE ... WITH (...)` and tables over files.
//!
//! The coordinator and the workers open file tables with the same code, so a view that
//! joins a file table reads the same files wherever its tasks run.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use datafusion::datasource::file_format::FileFormat;
use datafusion::datasource::file_format::csv::CsvFormat;
use datafusion::datasource::file_format::json::JsonFormat;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::sql::sqlparser::ast;
use dstream_planner::ConnectorSpec;

use crate::error::{Result, config_error};

/// The `WITH (...)` options of a `CREATE TABLE`, keys lower-cased.
pub fn table_options(options: &ast::CreateTableOptions) -> Result<BTreeMap<String, String>> {
    let list = match options {
        ast::CreateTableOptions::None => return Ok(BTreeMap::new()),
        ast::CreateTableOptions::With(list) => list,
        other => return Err(config_error(format!("unsupported table options {other}"))),
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
                return Err(config_error(format!("unexpected table option {other}")));
            }
        }
    }
    Ok(out)
}

/// A table over the files of a directory (or one file).
pub fn file_table(spec: &ConnectorSpec, schema: SchemaRef) -> Result<Arc<ListingTable>> {
    if spec.connector != "file" {
        return Err(config_error(format!(
            "tables support connector = 'file', not '{}'",
            spec.connector
        )));
    }
    let allowed = ["connector", "path", "format", "header"];
    if let Some(unknown) = spec.options.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(config_error(format!(
            "unknown option '{unknown}' for a file table; options are {}",
            allowed.join(", ")
        )));
    }
    let path = spec
        .options
        .get("path")
        .ok_or_else(|| config_error("a file table needs WITH (path = '...')"))?;
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
            return Err(config_error(format!(
                "unknown format '{other}'; use parquet, csv or json"
            )));
        }
    };
    let is_dir = std::path::Path::new(path).is_dir();
    if !is_dir && !std::path::Path::new(path).exists() {
        return Err(config_error(format!("path '{path}' does not exist")));
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
