//! `SUBSCRIBE TO view`: a view's current rows, then its changelog, one chunk per
//! interval, until the client goes away.
//!
//! Every row carries `_interval` (the interval it belongs to) and `op` (`insert` or
//! `delete`) before the view's columns. The subscription registers for changes before
//! it reads the snapshot, and skips changes the snapshot already contains, so no
//! interval is lost or repeated.

use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch, StringArray, TimestampNanosecondArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use dstream_storage::IntervalId;
use tokio::sync::broadcast;

use crate::cluster::remote_table::RemoteView;
use crate::engine::{ChangeBatch, Engine, Snapshot, SnapshotView};
use crate::error::{Error, Result};

/// The error for reading a view that stopped.
pub fn failed_view(view: &str, failure: &str) -> Error {
    Error::Invalid(format!(
        "materialized view \"{view}\" failed and stopped at {failure}; \
         drop it and create it again"
    ))
}

/// A live subscription to one view.
#[derive(Debug)]
pub struct Subscription {
    view: String,
    schema: SchemaRef,
    /// The snapshot's rows, sent first.
    initial: Option<Vec<RecordBatch>>,
    /// Changes up to and including this interval are in the snapshot.
    seen: Option<IntervalId>,
    initial_start: i64,
    changes: broadcast::Receiver<Arc<ChangeBatch>>,
}

/// `view` in `snapshot`, or an unknown-view error.
fn view_in<'a>(snapshot: &'a Snapshot, view: &str) -> Result<&'a SnapshotView> {
    snapshot
        .views
        .get(view)
        .ok_or_else(|| Error::UnknownObject {
            kind: "materialized view",
            name: view.to_string(),
        })
}

/// `_interval`, `op`, then the view's columns.
fn changelog_schema(view_schema: &SchemaRef) -> SchemaRef {
    let mut fields = vec![
        Field::new(
            "_interval",
            DataType::Timestamp(TimeUnit::Nanosecond, None),
            false,
        ),
        Field::new("op", DataType::Utf8, false),
    ];
    fields.extend(view_schema.fields().iter().map(|f| f.as_ref().clone()));
    Arc::new(Schema::new(fields))
}

impl Subscription {
    /// The schema a subscription to `view` streams, without starting one.
    pub fn schema_of(engine: &Engine, view: &str) -> Result<SchemaRef> {
        Ok(changelog_schema(&view_in(&engine.snapshot(), view)?.schema))
    }

    pub async fn start(engine: &Engine, view: &str) -> Result<Self> {
        let current = engine.snapshot();
        view_in(&current, view)?;
        if let Some(failure) = current.failed.get(view) {
            return Err(failed_view(view, failure));
        }
        // Register first, then read the snapshot: changes already in it are skipped.
        // Both between two intervals (under the engine's lock): the workers send a
        // view's changes back only while it has subscribers, so every interval
        // started after this sends them, and every one started before is in the
        // snapshot.
        let (changes, snapshot) = {
            let _between_intervals = engine.inner.state.lock().await;
            (engine.subscribe_changes(view), engine.snapshot())
        };
        let current_view = view_in(&snapshot, view)?;
        let view_schema = &current_view.schema;
        let schema = changelog_schema(view_schema);
        let remote = RemoteView {
            cluster: engine.cluster().clone(),
            name: view.to_string(),
            schema: view_schema.clone(),
            placement: current_view.placement.clone(),
            interval: snapshot.interval.unwrap_or(IntervalId(0)),
        };
        let rows: Vec<RecordBatch> = remote
            .fetch()
            .await
            .map_err(Error::DataFusion)?
            .into_iter()
            .flatten()
            .collect();
        Ok(Subscription {
            view: view.to_string(),
            schema,
            initial: Some(rows),
            seen: snapshot.interval,
            initial_start: snapshot.interval_start,
            changes,
        })
    }

    /// `_interval`, `op`, then the view's columns.
    pub fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    /// The next chunk of rows: first the snapshot, then one chunk per interval with
    /// changes. `None` when the view is dropped.
    pub async fn next_chunk(&mut self) -> Option<Result<Vec<RecordBatch>>> {
        if let Some(rows) = self.initial.take() {
            return Some(self.tag(&rows, "insert", self.initial_start));
        }
        loop {
            match self.changes.recv().await {
                Ok(change) => {
                    if let Some(failure) = &change.failure {
                        return Some(Err(Error::Invalid(format!(
                            "materialized view \"{}\" failed and stopped at {failure}",
                            self.view
                        ))));
                    }
                    if self.seen.is_some_and(|seen| change.interval <= seen) {
                        continue;
                    }
                    let mut out = match self.tag(
                        &change.changelog.deletes,
                        "delete",
                        change.interval_start,
                    ) {
                        Ok(out) => out,
                        Err(e) => return Some(Err(e)),
                    };
                    match self.tag(&change.changelog.inserts, "insert", change.interval_start) {
                        Ok(inserts) => out.extend(inserts),
                        Err(e) => return Some(Err(e)),
                    }
                    return Some(Ok(out));
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    return Some(Err(Error::Invalid(format!(
                        "subscription to \"{}\" fell {n} intervals behind and was closed; subscribe again",
                        self.view
                    ))));
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }

    fn tag(&self, rows: &[RecordBatch], op: &str, interval_start: i64) -> Result<Vec<RecordBatch>> {
        rows.iter()
            .filter(|b| b.num_rows() > 0)
            .map(|b| {
                let n = b.num_rows();
                let mut columns: Vec<ArrayRef> = vec![
                    Arc::new(TimestampNanosecondArray::from_value(interval_start, n)),
                    Arc::new(StringArray::from(vec![op; n])),
                ];
                columns.extend(b.columns().iter().cloned());
                RecordBatch::try_new(self.schema.clone(), columns)
                    .map_err(|e| Error::Internal(e.to_string()))
            })
            .collect()
    }
}
