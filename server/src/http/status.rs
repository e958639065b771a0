//! Management: what the server, its sources, tables, views and workers report, and
//! its recent intervals, checkpoints and recoveries, as JSON.
//!
//! Sources, tables and views are read from the last published snapshot
//! ([`crate::status::ObjectStatus`]), so an answer never waits for an interval in
//! progress. The same figures are in the system tables (`dstream_intervals`,
//! `dstream_workers`, `dstream_checkpoints`, `dstream_recoveries`) and the metrics.

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::error::HttpError;
use crate::engine::Engine;
use crate::error::Error;
use crate::session::format_timestamp;
use crate::status::{SourceStatus, TableStatus, ViewStatus};
use crate::system_tables::{WorkerRow, millis};

/// The server and its last interval.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ServerStatus {
    /// The server's version.
    pub version: String,
    /// The width of an interval (`batch_interval`), in milliseconds.
    pub batch_interval_ms: f64,
    /// The last committed interval, and when it started.
    pub committed_interval: Option<u64>,
    pub committed_interval_start: Option<String>,
    /// Of the last committed interval: its input, how late processing started after
    /// it ended, how long processing took, and both together.
    pub input_rows: u64,
    pub scheduling_delay_ms: f64,
    pub processing_time_ms: f64,
    pub total_delay_ms: f64,
    /// Workers alive, and workers that joined in all (alive, leaving, left, dead).
    pub workers_alive: u64,
    pub workers: u64,
    pub sources: u64,
    pub tables: u64,
    pub views: u64,
    /// Views that failed and stopped.
    pub failed_views: u64,
    /// The newest committed checkpoint's interval.
    pub checkpoint_interval: Option<u64>,
}

/// The server and its last interval.
#[utoipa::path(
    get,
    path = "/v1/status",
    responses((status = 200, description = "The server and its last interval", body = ServerStatus))
)]
pub async fn server_status(State(engine): State<Engine>) -> Json<ServerStatus> {
    let snapshot = engine.snapshot();
    let last = engine.interval_history().last().copied();
    let workers = engine.cluster().workers();
    let checkpoint_interval = engine
        .checkpoint_history()
        .iter()
        .rev()
        .find(|c| c.error.is_none())
        .map(|c| c.interval.0);
    let status = &snapshot.status;
    Json(ServerStatus {
        version: env!("CARGO_PKG_VERSION").into(),
        batch_interval_ms: snapshot.interval_nanos as f64 / 1e6,
        committed_interval: snapshot.interval.map(|i| i.0),
        committed_interval_start: snapshot
            .interval
            .map(|_| format_timestamp(snapshot.interval_start)),
        input_rows: last.map_or(0, |l| l.input_rows),
        scheduling_delay_ms: last.map_or(0.0, |l| millis(l.scheduling_delay)),
        processing_time_ms: last.map_or(0.0, |l| millis(l.processing_time)),
        total_delay_ms: last.map_or(0.0, |l| {
            millis(l.scheduling_delay.saturating_add(l.processing_time))
        }),
        workers_alive: workers.iter().filter(|w| w.is_alive()).count() as u64,
        workers: workers.len() as u64,
        sources: status.sources.len() as u64,
        tables: status.tables.len() as u64,
        views: status.views.len() as u64,
        failed_views: status.views.iter().filter(|v| v.error.is_some()).count() as u64,
        checkpoint_interval,
    })
}

/// The entry of `entries` named `name` (by `name_of`), or an unknown-name error for
/// a `kind`.
fn named<T: Clone>(
    entries: &[T],
    name: &str,
    name_of: impl Fn(&T) -> &str,
    kind: &'static str,
) -> Result<Json<T>, HttpError> {
    let found = entries.iter().find(|e| name_of(e) == name).cloned();
    found.map(Json).ok_or_else(|| {
        HttpError::from(Error::UnknownObject {
            kind,
            name: name.to_string(),
        })
    })
}

/// Every source, with what its receivers have seen.
#[utoipa::path(
    get,
    path = "/v1/sources",
    responses((status = 200, description = "Every source, by name", body = Vec<SourceStatus>))
)]
pub async fn sources(State(engine): State<Engine>) -> Json<Vec<SourceStatus>> {
    Json(engine.snapshot().status.sources.clone())
}

/// One source.
#[utoipa::path(
    get,
    path = "/v1/sources/{name}",
    params(("name" = String, Path, description = "The source's name")),
    responses(
        (status = 200, description = "The source", body = SourceStatus),
        (status = 404, description = "No such source", body = super::error::ApiError),
    )
)]
pub async fn source(
    State(engine): State<Engine>,
    Path(name): Path<String>,
) -> Result<Json<SourceStatus>, HttpError> {
    let snapshot = engine.snapshot();
    named(&snapshot.status.sources, &name, |e| &e.name, "source")
}

/// Every table.
#[utoipa::path(
    get,
    path = "/v1/tables",
    responses((status = 200, description = "Every table, by name", body = Vec<TableStatus>))
)]
pub async fn tables(State(engine): State<Engine>) -> Json<Vec<TableStatus>> {
    Json(engine.snapshot().status.tables.clone())
}

/// One table.
#[utoipa::path(
    get,
    path = "/v1/tables/{name}",
    params(("name" = String, Path, description = "The table's name")),
    responses(
        (status = 200, description = "The table", body = TableStatus),
        (status = 404, description = "No such table", body = super::error::ApiError),
    )
)]
pub async fn table(
    State(engine): State<Engine>,
    Path(name): Path<String>,
) -> Result<Json<TableStatus>, HttpError> {
    let snapshot = engine.snapshot();
    named(&snapshot.status.tables, &name, |e| &e.name, "table")
}

/// Every materialized view, with what its last interval did.
#[utoipa::path(
    get,
    path = "/v1/views",
    responses((status = 200, description = "Every materialized view, by name", body = Vec<ViewStatus>))
)]
pub async fn views(State(engine): State<Engine>) -> Json<Vec<ViewStatus>> {
    Json(engine.snapshot().status.views.clone())
}

/// One materialized view.
#[utoipa::path(
    get,
    path = "/v1/views/{name}",
    params(("name" = String, Path, description = "The view's name")),
    responses(
        (status = 200, description = "The view", body = ViewStatus),
        (status = 404, description = "No such view", body = super::error::ApiError),
    )
)]
pub async fn view(
    State(engine): State<Engine>,
    Path(name): Path<String>,
) -> Result<Json<ViewStatus>, HttpError> {
    let snapshot = engine.snapshot();
    named(
        &snapshot.status.views,
        &name,
        |e| &e.name,
        "materialized view",
    )
}

/// Every worker that joined, asking each reachable one for its status.
#[utoipa::path(
    get,
    path = "/v1/workers",
    responses((status = 200, description = "Every worker that joined, as `dstream_workers` shows them", body = Vec<WorkerRow>))
)]
pub async fn workers(State(engine): State<Engine>) -> Json<Vec<WorkerRow>> {
    Json(engine.workers_table().rows().await)
}

/// How many of the most recent entries of a history to answer with.
#[derive(Debug, Deserialize, IntoParams)]
pub struct Recent {
    /// At most this many, newest last (default 100).
    pub limit: Option<usize>,
}

/// The query of a request for recent entries.
fn recent_of(query: Result<Query<Recent>, QueryRejection>) -> Result<Recent, HttpError> {
    query
        .map(|Query(recent)| recent)
        .map_err(|e| HttpError::request(StatusCode::BAD_REQUEST, "bad_request", e.body_text()))
}

impl Recent {
    /// The last `limit` of `history`.
    fn of<T>(&self, history: Vec<T>) -> Vec<T> {
        let limit = self.limit.unwrap_or(100);
        let skip = history.len().saturating_sub(limit);
        history.into_iter().skip(skip).collect()
    }
}

/// One interval, as `dstream_intervals` shows it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct IntervalRow {
    pub interval_id: u64,
    pub interval_start: String,
    pub input_rows: u64,
    pub scheduling_delay_ms: f64,
    pub processing_time_ms: f64,
    pub total_delay_ms: f64,
    pub map_tasks: u64,
    pub map_tasks_ahead: u64,
    pub reduce_tasks: u64,
    pub shuffle_bytes: u64,
    pub workers: u64,
    pub speculative_tasks: u64,
}

/// Recent intervals, oldest first.
#[utoipa::path(
    get,
    path = "/v1/intervals",
    params(Recent),
    responses(
        (status = 200, description = "Recent intervals, oldest first", body = Vec<IntervalRow>),
        (status = 400, description = "A bad `limit`", body = super::error::ApiError),
    )
)]
pub async fn intervals(
    State(engine): State<Engine>,
    recent: Result<Query<Recent>, QueryRejection>,
) -> Result<Json<Vec<IntervalRow>>, HttpError> {
    let rows = recent_of(recent)?.of(engine.interval_history());
    Ok(Json(
        rows.into_iter()
            .map(|h| IntervalRow {
                interval_id: h.interval.0,
                interval_start: format_timestamp(h.start_nanos),
                input_rows: h.input_rows,
                scheduling_delay_ms: millis(h.scheduling_delay),
                processing_time_ms: millis(h.processing_time),
                total_delay_ms: millis(h.scheduling_delay.saturating_add(h.processing_time)),
                map_tasks: h.map_tasks,
                map_tasks_ahead: h.map_tasks_ahead,
                reduce_tasks: h.reduce_tasks,
                shuffle_bytes: h.shuffle_bytes,
                workers: h.workers,
                speculative_tasks: h.speculative_tasks,
            })
            .collect(),
    ))
}

/// One checkpoint, as `dstream_checkpoints` shows it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CheckpointRow {
    pub interval_id: u64,
    pub started_at: String,
    pub duration_ms: f64,
    /// `committed` or `failed` (see `error`).
    pub status: String,
    pub views: u64,
    pub partitions: u64,
    pub files: u64,
    pub bytes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Recent checkpoints, oldest first.
#[utoipa::path(
    get,
    path = "/v1/checkpoints",
    params(Recent),
    responses(
        (status = 200, description = "Recent checkpoints, oldest first", body = Vec<CheckpointRow>),
        (status = 400, description = "A bad `limit`", body = super::error::ApiError),
    )
)]
pub async fn checkpoints(
    State(engine): State<Engine>,
    recent: Result<Query<Recent>, QueryRejection>,
) -> Result<Json<Vec<CheckpointRow>>, HttpError> {
    let rows = recent_of(recent)?.of(engine.checkpoint_history());
    Ok(Json(
        rows.into_iter()
            .map(|c| CheckpointRow {
                interval_id: c.interval.0,
                started_at: format_timestamp(c.started_at_nanos),
                duration_ms: millis(c.duration),
                status: if c.error.is_some() {
                    "failed"
                } else {
                    "committed"
                }
                .into(),
                views: c.views,
                partitions: c.partitions,
                files: c.files,
                bytes: c.bytes,
                error: c.error,
            })
            .collect(),
    ))
}

/// One recovery from lost workers, as `dstream_recoveries` shows it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RecoveryRow {
    pub started_at: String,
    /// The interval about to run when it started.
    pub interval_id: u64,
    pub lost_workers: Vec<u64>,
    /// Receivers and state partitions it moved.
    pub receivers: u64,
    pub partitions: u64,
    /// The checkpoint lost partitions were loaded from.
    pub checkpoint_interval: Option<u64>,
    pub replayed_intervals: u64,
    pub duration_ms: f64,
    /// `recovered` or `failed` (see `error`).
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Recent recoveries from lost workers, oldest first.
#[utoipa::path(
    get,
    path = "/v1/recoveries",
    params(Recent),
    responses(
        (status = 200, description = "Recent recoveries, oldest first", body = Vec<RecoveryRow>),
        (status = 400, description = "A bad `limit`", body = super::error::ApiError),
    )
)]
pub async fn recoveries(
    State(engine): State<Engine>,
    recent: Result<Query<Recent>, QueryRejection>,
) -> Result<Json<Vec<RecoveryRow>>, HttpError> {
    let rows = recent_of(recent)?.of(engine.recovery_history());
    Ok(Json(
        rows.into_iter()
            .map(|r| RecoveryRow {
                started_at: format_timestamp(r.started_at_nanos),
                interval_id: r.interval.0,
                lost_workers: r.workers,
                receivers: r.receivers,
                partitions: r.partitions,
                checkpoint_interval: r.checkpoint.map(|c| c.0),
                replayed_intervals: r.replayed_intervals,
                duration_ms: millis(r.duration),
                status: if r.error.is_some() {
                    "failed"
                } else {
                    "recovered"
                }
                .into(),
                error: r.error,
            })
            .collect(),
    ))
}
