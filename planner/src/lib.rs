//! dstream-planner: the SQL dialect, the catalog, and the compilation of continuous
//! queries into stream plans.
//!
//! The entry points are [`statement::parse_statements`], which reads dstream SQL, and
//! [`dataflow::plan_dataflow`], which compiles a `CREATE MATERIALIZED VIEW` into a
//! [`Dataflow`] of [`StreamPlan`] stages.
//!
//! # Layout
//! - [`statement`]: dstream's statements and their parser.
//! - [`duration`]: durations and SQL interval literals.
//! - [`limits`]: [`limits::StatementLimits`], how big and deep a statement may be.
//! - [`window`]: `TUMBLE` and `HOP`, rewritten into pane columns.
//! - [`catalog`]: definitions of sources, tables and views.
//! - [`definition`]: schemas and source definitions from CREATE statements.
//! - [`dataflow`]: a view's query cut into stages at its stateful operators.
//! - [`stream_plan`]: one stage, split into input, operator and output.
//! - [`stage_dag`]: the per-interval stage DAG and EXPLAIN text.
//! - [`error`]: the crate's [`Error`] and [`Result`].

// A statement reaches the planner from a client: outside tests slice indexing is
// refused, as `unwrap` is for the whole workspace.
#![cfg_attr(not(test), warn(clippy::indexing_slicing))]

pub mod catalog;
pub mod dataflow;
pub mod definition;
pub mod duration;
pub mod error;
pub mod limits;
pub mod stage_dag;
pub mod statement;
pub mod stream_plan;
pub mod window;

pub use catalog::{
    Catalog, CatalogObject, ConnectorSpec, SourceDef, TableDef, ViewDef, WatermarkDef,
};
pub use dataflow::{Dataflow, plan_dataflow};
pub use error::{Error, Result};
pub use limits::StatementLimits;
pub use statement::{EmitMode, ObjectKind, Statement};
pub use stream_plan::{
    AggregateCall, AggregateKind, AggregatePlan, KeyedKind, KeyedPlan, StreamPlan,
};
pub use window::{INTERVAL_COLUMN, WindowKind, WindowSpec};
