//! `SUBSCRIBE TO view`: a view's current rows, then its changelog, one chunk per
//! interval, until the client goes away. [`Subscription`] is the stream; the HTTP API
//! serves the same stream as events, and resumes one after the last interval a
//! client saw ([`Subscription::resume`], from the changes [`crate::changes`] keeps).
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

/// What a subscription delivers next.
#[derive(Debug)]
pub enum SubscriptionEvent {
    /// The view's rows as of `interval` (`None`: before the first interval): they
    /// replace whatever the subscriber had.
    Snapshot {
        interval: Option<IntervalId>,
        interval_start: i64,
        rows: Vec<RecordBatch>,
    },
    /// The view's changes in one interval.
    Changes(Arc<ChangeBatch>),
}

/// A live subscription to one view.
#[derive(Debug)]
pub struct Subscription {
    view: String,
    schema: SchemaRef,
    /// What comes before the live changes: the snapshot, or the kept changes of the
    /// intervals a resumed subscription missed.
    first: std::collections::VecDeque<SubscriptionEvent>,
    /// Changes up to and including this interval were delivered already.
    seen: Option<IntervalId>,
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

    /// Subscribes to `view`: its current rows, then its changes.
    pub async fn start(engine: &Engine, view: &str) -> Result<Self> {
        Self::resume(engine, view, None).await
    }

    /// Subscribes to `view` as a subscriber that has seen every change up to and
    /// including interval `after`: the changes since, if they are all still kept,
    /// and otherwise (or without `after`) the view's current rows; then the changes
    /// of every later interval.
    pub async fn resume(engine: &Engine, view: &str, after: Option<IntervalId>) -> Result<Self> {
        let current = engine.snapshot();
        view_in(&current, view)?;
        if let Some(failure) = current.failed.get(view) {
            return Err(failed_view(view, failure));
        }
        // Register first, then read the snapshot: changes already in it are skipped.
        // Both between two intervals (under the engine's lock): the workers send a
        // view's changes back only while it has subscribers, so every interval
        // started after this sends them, and every one started before is in the
        // snapshot (or in the changes kept).
        let (changes, snapshot, missed) = {
            let state = engine.inner.state.lock().await;
            let changes = engine.subscribe_changes(view, state.next);
            let snapshot = engine.snapshot();
            // A subscriber ahead of the committed state (of a server that restarted
            // from an older checkpoint) starts again from the snapshot.
            let missed = match (after, snapshot.interval) {
                (Some(after), Some(committed)) if after == committed => Some(Vec::new()),
                (Some(after), Some(committed)) if after < committed => {
                    engine.changes_since(view, after)
                }
                _ => None,
            };
            (changes, snapshot, missed)
        };
        let current_view = view_in(&snapshot, view)?;
        let view_schema = &current_view.schema;
        let schema = changelog_schema(view_schema);
        let (first, seen) = match missed {
            // Delivered: the changes kept (or none after `after`). An interval
            // committed but not yet published when they were read comes on the
            // broadcast, after them.
            Some(missed) => {
                let seen = missed.last().map(|c| c.interval).or(after);
                (
                    missed.into_iter().map(SubscriptionEvent::Changes).collect(),
                    seen,
                )
            }
            None => {
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
                let snapshot_event = SubscriptionEvent::Snapshot {
                    interval: snapshot.interval,
                    interval_start: snapshot.interval_start,
                    rows,
                };
                (std::iter::once(snapshot_event).collect(), snapshot.interval)
            }
        };
        Ok(Subscription {
            view: view.to_string(),
            schema,
            first,
            seen,
            changes,
        })
    }

    /// The view's columns, without `_interval` and `op`.
    pub fn view_schema(&self) -> SchemaRef {
        let fields = self
            .schema
            .fields()
            .iter()
            .skip(2)
            .cloned()
            .collect::<Vec<_>>();
        Arc::new(Schema::new(fields))
    }

    /// The next event: first the snapshot (or the changes a resumed subscription
    /// missed), then one per interval that changed the view. `None` when the view is
    /// dropped; an error when it failed, or when the subscriber fell too far behind.
    pub async fn next_event(&mut self) -> Option<Result<SubscriptionEvent>> {
        if let Some(event) = self.first.pop_front() {
            return Some(Ok(event));
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
                    self.seen = Some(change.interval);
                    return Some(Ok(SubscriptionEvent::Changes(change)));
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

    /// The next chunk of rows, each tagged with `_interval` and `op`: first the
    /// snapshot, then one chunk per interval with changes. `None` when the view is
    /// dropped.
    pub async fn next_chunk(&mut self) -> Option<Result<Vec<RecordBatch>>> {
        let event = match self.next_event().await? {
            Ok(event) => event,
            Err(e) => return Some(Err(e)),
        };
        Some(match event {
            SubscriptionEvent::Snapshot {
                interval_start,
                rows,
                ..
            } => self.tag(&rows, "insert", interval_start),
            SubscriptionEvent::Changes(change) => self
                .tag(&change.changelog.deletes, "delete", change.interval_start)
                .and_then(|mut out| {
                    out.extend(self.tag(
                        &change.changelog.inserts,
                        "insert",
                        change.interval_start,
                    )?);
                    Ok(out)
                }),
        })
    }

    /// `_interval`, `op`, then the view's columns.
    pub fn schema(&self) -> &SchemaRef {
        &self.schema
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
