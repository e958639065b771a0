//! What the server reports about its sources, tables and views as of the last
//! committed interval: [`ObjectStatus`]. The engine builds it whenever it publishes
//! a snapshot (every commit and definition), so reading it never waits for an
//! interval in progress; the HTTP API serves it.

use arrow::datatypes::SchemaRef;
use dstream_planner::dataflow::STAGE_SEPARATOR;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::session::{format_timestamp, sql_type_name};
use crate::state::view::StageStats;
use crate::state::{EngineState, TableSlot};
use crate::system_tables::millis;

/// A column of a relation or a result.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct Column {
    pub name: String,
    /// The SQL type, as `DESCRIBE` names it (e.g. `BIGINT`, `TIMESTAMP`).
    #[serde(rename = "type")]
    pub sql_type: String,
    pub nullable: bool,
}

/// The columns of `schema`.
pub fn columns_of(schema: &SchemaRef) -> Vec<Column> {
    schema
        .fields()
        .iter()
        .map(|f| Column {
            name: f.name().clone(),
            sql_type: sql_type_name(f.data_type()),
            nullable: f.is_nullable(),
        })
        .collect()
}

/// A source and what its receivers have seen.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct SourceStatus {
    pub name: String,
    /// `generator`, `tcp`, `directory`, `nexmark`, ...
    pub connector: String,
    /// `running`, or `failed` (see `error`).
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// How many receivers (splits) read it.
    pub receivers: u32,
    /// Records accepted since the source was created.
    pub records: u64,
    /// Malformed records skipped (under `on_error = 'skip'`).
    pub malformed: u64,
    /// Rows dropped for being later than the watermark.
    pub late_rows: u64,
    /// The source's event-time watermark, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watermark: Option<String>,
    /// The last interval whose input is recorded.
    pub last_interval: Option<u64>,
    /// Rows of that interval's input.
    pub last_interval_rows: u64,
    /// Intervals of input kept (for ad-hoc reads and recovery), their rows and size.
    pub retained_intervals: u64,
    pub retained_rows: u64,
    pub retained_bytes: u64,
    pub columns: Vec<Column>,
}

/// A static table.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct TableStatus {
    pub name: String,
    /// `memory` (rows inserted with `INSERT`) or `file` (files in a directory).
    pub kind: String,
    pub columns: Vec<Column>,
}

/// A materialized view and what its last interval did.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct ViewStatus {
    pub name: String,
    /// The sources, tables and views it reads.
    pub reads: Vec<String>,
    /// When it emits: `on update`, `on window close` or `append`.
    pub emit: String,
    /// `running`, `starting` (no interval yet) or `failed` (see `error`).
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Stages of its dataflow, and state partitions of its last stage.
    pub stages: u32,
    pub partitions: u32,
    /// The last interval it committed.
    pub last_interval: Option<u64>,
    /// Rows of the view.
    pub rows: u64,
    /// In its last interval: rows its first stages read, and rows of its changelog.
    pub rows_in: u64,
    pub rows_out: u64,
    /// Rows and estimated memory of every stage's state.
    pub state_rows: u64,
    pub state_bytes: u64,
    /// Time its tasks ran in its last interval, summed over the tasks.
    pub task_time_ms: f64,
    pub columns: Vec<Column>,
}

/// Every source, table and view, by name.
#[derive(Clone, Debug, Default)]
pub struct ObjectStatus {
    pub sources: Vec<SourceStatus>,
    pub tables: Vec<TableStatus>,
    pub views: Vec<ViewStatus>,
}

impl ObjectStatus {
    /// The status of everything in `state`.
    pub fn of(state: &EngineState) -> Self {
        ObjectStatus {
            sources: sources(state),
            tables: tables(state),
            views: views(state),
        }
    }
}

fn status_of(failure: &Option<String>) -> (String, Option<String>) {
    match failure {
        Some(f) => ("failed".into(), Some(f.clone())),
        None => ("running".into(), None),
    }
}

fn sources(state: &EngineState) -> Vec<SourceStatus> {
    state
        .sources
        .iter()
        .map(|(name, slot)| {
            let (status, error) = status_of(&slot.failure);
            let last = slot.retained.back();
            let retained = slot.recent_blocks();
            SourceStatus {
                name: name.clone(),
                connector: slot.def.connector.connector.clone(),
                status,
                error,
                receivers: slot.receivers.len() as u32,
                records: slot.stats.receiver.records,
                malformed: slot.stats.receiver.malformed,
                late_rows: slot.stats.late_rows,
                watermark: slot.stats.watermark.map(format_timestamp),
                last_interval: last.map(|s| s.interval.0),
                last_interval_rows: last
                    .map(|s| s.blocks.iter().map(|b| b.rows).sum())
                    .unwrap_or(0),
                retained_intervals: slot.retained.len().min(slot.retain_intervals) as u64,
                retained_rows: retained.iter().map(|b| b.rows).sum(),
                retained_bytes: retained.iter().map(|b| b.bytes).sum(),
                columns: columns_of(&slot.def.schema),
            }
        })
        .collect()
}

fn tables(state: &EngineState) -> Vec<TableStatus> {
    state
        .tables
        .iter()
        .map(|(name, slot)| TableStatus {
            name: name.clone(),
            kind: match slot {
                TableSlot::File(_) => "file",
                TableSlot::Memory(_) => "memory",
            }
            .into(),
            columns: columns_of(&slot.provider().schema()),
        })
        .collect()
}

fn views(state: &EngineState) -> Vec<ViewStatus> {
    state
        .views
        .iter()
        .filter(|(_, slot)| !slot.is_inner_stage())
        .map(|(name, slot)| {
            let stages: Vec<_> = state
                .stages_of(name)
                .iter()
                .filter_map(|s| state.views.get(s))
                .collect();
            let outer = |input: &String| !input.contains(STAGE_SEPARATOR);
            let mut reads: Vec<String> = stages
                .iter()
                .flat_map(|s| s.plan.inputs.iter().filter(|i| outer(i)).cloned())
                .collect();
            reads.sort();
            reads.dedup();
            // What enters the dataflow: the stages that read from outside it.
            let rows_in = stages
                .iter()
                .filter(|s| s.plan.inputs.iter().any(outer))
                .map(|s| s.stats.rows_in)
                .fold(0u64, u64::saturating_add);
            let total = stages
                .iter()
                .map(|s| s.stats)
                .fold(StageStats::default(), StageStats::plus);
            let (status, error) = match (&slot.failure, slot.last_interval) {
                (Some(f), _) => ("failed".to_string(), Some(f.clone())),
                (None, None) => ("starting".to_string(), None),
                (None, Some(_)) => ("running".to_string(), None),
            };
            ViewStatus {
                name: name.clone(),
                reads,
                emit: slot.plan.emit.to_string(),
                status,
                error,
                stages: stages.len() as u32,
                partitions: slot.placement.len() as u32,
                last_interval: slot.last_interval.map(|i| i.0),
                rows: slot.partition_rows.iter().sum(),
                rows_in,
                rows_out: slot.stats.rows_out,
                state_rows: total.state_rows,
                state_bytes: total.state_bytes,
                task_time_ms: millis(std::time::Duration::from_micros(total.task_micros)),
                columns: columns_of(&slot.plan.schema),
            }
        })
        .collect()
}
