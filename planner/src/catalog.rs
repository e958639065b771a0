//! The catalog: every source, table and materialized view the server knows.
//!
//! [`Catalog`] holds definitions only. The data behind them (received intervals,
//! table rows, view state) lives in the executor; the catalog is what the planner
//! resolves names against and what `storage` persists.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use datafusion::logical_expr::Expr;

use crate::dataflow::Dataflow;
use crate::error::{Error, Result};
use crate::statement::ObjectKind;
use crate::stream_plan::StreamPlan;

/// Where a source's records come from: a connector name and its `WITH` options.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectorSpec {
    pub connector: String,
    pub options: BTreeMap<String, String>,
}

/// The watermark of a source: rows whose `column` is below it are late.
#[derive(Clone, Debug)]
pub struct WatermarkDef {
    /// The event-time column the watermark is defined for.
    pub column: String,
    /// The watermark expression over one row, e.g. `date_time - INTERVAL '4' SECOND`;
    /// the source's watermark is the maximum of it over all rows received so far.
    pub expr: Expr,
    /// The expression as written.
    pub sql: String,
}

/// An append-only stream of records.
#[derive(Clone, Debug)]
pub struct SourceDef {
    pub name: String,
    /// The declared columns followed by `_interval`.
    pub schema: SchemaRef,
    /// The declared columns only: the shape of records as connectors deliver them.
    pub record_schema: SchemaRef,
    pub watermark: Option<WatermarkDef>,
    pub connector: ConnectorSpec,
    pub sql: String,
}

/// A static table: rows inserted with `INSERT`, or files in a directory.
#[derive(Clone, Debug)]
pub struct TableDef {
    pub name: String,
    pub schema: SchemaRef,
    /// For file-backed tables: the connector options (`path`, `format`).
    pub file: Option<ConnectorSpec>,
    pub sql: String,
}

/// A continuous query whose result is kept as queryable state.
#[derive(Clone, Debug)]
pub struct ViewDef {
    pub name: String,
    /// The view's own stage, the last of `dataflow`.
    pub plan: Arc<StreamPlan>,
    pub dataflow: Arc<Dataflow>,
    pub sql: String,
}

impl ViewDef {
    pub fn new(dataflow: Dataflow, sql: String) -> Result<Self> {
        Ok(ViewDef {
            name: dataflow.view.clone(),
            plan: dataflow.output()?.clone(),
            dataflow: Arc::new(dataflow),
            sql,
        })
    }
}

/// One catalog object.
#[derive(Clone, Debug)]
pub enum CatalogObject {
    Source(Arc<SourceDef>),
    Table(Arc<TableDef>),
    View(Arc<ViewDef>),
}

impl CatalogObject {
    pub fn kind(&self) -> ObjectKind {
        match self {
            CatalogObject::Source(_) => ObjectKind::Source,
            CatalogObject::Table(_) => ObjectKind::Table,
            CatalogObject::View(_) => ObjectKind::MaterializedView,
        }
    }

    pub fn name(&self) -> &str {
        match self {
            CatalogObject::Source(s) => &s.name,
            CatalogObject::Table(t) => &t.name,
            CatalogObject::View(v) => &v.name,
        }
    }

    /// The statement that created the object.
    pub fn sql(&self) -> &str {
        match self {
            CatalogObject::Source(s) => &s.sql,
            CatalogObject::Table(t) => &t.sql,
            CatalogObject::View(v) => &v.sql,
        }
    }

    /// The schema users see when they query the object.
    pub fn schema(&self) -> SchemaRef {
        match self {
            CatalogObject::Source(s) => s.schema.clone(),
            CatalogObject::Table(t) => t.schema.clone(),
            CatalogObject::View(v) => v.plan.schema.clone(),
        }
    }
}

/// All definitions, by name (names are unique across kinds), in creation order.
#[derive(Clone, Debug, Default)]
pub struct Catalog {
    objects: BTreeMap<String, CatalogObject>,
    order: Vec<String>,
}

impl Catalog {
    pub fn get(&self, name: &str) -> Option<&CatalogObject> {
        self.objects.get(name)
    }

    pub fn source(&self, name: &str) -> Option<&Arc<SourceDef>> {
        match self.objects.get(name) {
            Some(CatalogObject::Source(s)) => Some(s),
            _ => None,
        }
    }

    /// Fails with a clear message if `name` is taken.
    pub fn check_free(&self, name: &str) -> Result<()> {
        match self.objects.get(name) {
            Some(existing) => Err(Error::DuplicateObject {
                kind: existing.kind().as_str(),
                name: name.to_string(),
            }),
            None => Ok(()),
        }
    }

    /// Adds an object; its name must be free.
    pub fn insert(&mut self, object: CatalogObject) -> Result<()> {
        let name = object.name().to_string();
        self.check_free(&name)?;
        self.order.push(name.clone());
        self.objects.insert(name, object);
        Ok(())
    }

    /// Removes the object `name` of kind `kind`, refusing if views depend on it.
    pub fn remove(&mut self, kind: ObjectKind, name: &str) -> Result<CatalogObject> {
        match self.objects.get(name) {
            None => {
                return Err(Error::UnknownObject {
                    kind: kind.as_str(),
                    name: name.to_string(),
                });
            }
            Some(obj) if obj.kind() != kind => {
                return Err(Error::Invalid(format!(
                    "\"{name}\" is a {}, not a {kind}; use DROP {}",
                    obj.kind(),
                    obj.kind().as_str().to_ascii_uppercase()
                )));
            }
            Some(_) => {}
        }
        let dependents = self.dependents(name);
        if !dependents.is_empty() {
            return Err(Error::Invalid(format!(
                "cannot drop {kind} \"{name}\": materialized view {} depends on it; drop it first, or use DROP ... CASCADE",
                dependents.join(", ")
            )));
        }
        self.order.retain(|n| n != name);
        self.objects
            .remove(name)
            .ok_or_else(|| Error::Internal(format!("catalog lost {name}")))
    }

    /// Views that read `name`, and the views that read those, in an order they can
    /// be dropped in (readers first).
    pub fn dependents_deep(&self, name: &str) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        fn visit(catalog: &Catalog, name: &str, out: &mut Vec<String>, depth: usize) {
            if depth > catalog.objects.len() {
                return;
            }
            for dependent in catalog.dependents(name) {
                visit(catalog, &dependent, out, depth.saturating_add(1));
                if !out.contains(&dependent) {
                    out.push(dependent);
                }
            }
        }
        visit(self, name, &mut out, 0);
        out
    }

    /// Views that read `name`.
    pub fn dependents(&self, name: &str) -> Vec<String> {
        self.objects
            .values()
            .filter_map(|obj| match obj {
                CatalogObject::View(v) if v.dataflow.reads().iter().any(|r| r == name) => {
                    Some(v.name.clone())
                }
                _ => None,
            })
            .collect()
    }

    /// Objects of one kind, in creation order.
    pub fn list(&self, kind: ObjectKind) -> Vec<&CatalogObject> {
        self.iter().filter(|o| o.kind() == kind).collect()
    }

    /// All objects in creation order.
    pub fn iter(&self) -> impl Iterator<Item = &CatalogObject> {
        self.order.iter().filter_map(|n| self.objects.get(n))
    }
}
