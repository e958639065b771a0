//! Sliding windows by add/subtract — the D-Stream `reduceByWindow` with an inverse.
//!
//! For `HOP(..., slide, size) ... EMIT ON WINDOW CLOSE` with invertible aggregates
//! (count, sum, avg), the state of a partition holds one accumulator row per
//! (pane, group) — a pane being a tumbling window of width `slide` — and the
//! accumulators of the last emitted window per group. When the watermark closes the
//! window ending at `e`, it is computed from the previous one as
//!
//! ```text
//! window(e) = window(e - slide) + pane(e - slide) - pane(e - slide - size)
//! ```
//!
//! so each step touches two panes, however many panes a window spans. Only the first
//! window after a gap is assembled from all its panes. Panes older than the next
//! subtraction needs are dropped.

use std::sync::Arc;

use arrow::array::{ArrayRef, BooleanArray, Int64Array, RecordBatch, TimestampNanosecondArray};
use arrow::compute::filter_record_batch;
use arrow::compute::kernels::cmp::gt;
use arrow::compute::kernels::numeric::neg;
use arrow::datatypes::DataType;
use datafusion::prelude::SessionContext;

use crate::error::{Error, Result};
use crate::operator::aggregate::{ACCUMULATORS, AggregateOperator, RUNNING, relabel};
use crate::operator::{Changelog, PartitionOutput, StatePartition, ViewUpdate};

/// How to set the window key columns of accumulator rows.
enum WindowColumns {
    /// NULL: the row stands for its group in whatever window is current.
    Cleared,
    /// The window `[end - size, end)`.
    Window { end: i64 },
}

impl AggregateOperator {
    fn slide_nanos(&self) -> Result<(i64, i64)> {
        let window = self
            .plan
            .window
            .as_ref()
            .ok_or_else(|| Error::Internal("sliding operator without a window".into()))?;
        Ok((
            window.slide.as_nanos() as i64,
            window.size.as_nanos() as i64,
        ))
    }

    /// The pane start of every row of a pane batch.
    fn pane_starts(&self, batch: &RecordBatch) -> Result<Vec<i64>> {
        let aggregate = self.aggregate();
        let (slide, _) = self.slide_nanos()?;
        let (column, offset) = match (aggregate.window_start_key, aggregate.window_end_key) {
            (Some(k), _) => (k, 0),
            (None, Some(k)) => (k, slide),
            (None, None) => {
                return Err(Error::Internal("sliding window without window keys".into()));
            }
        };
        let times = arrow::compute::cast(
            batch.column(column),
            &DataType::Timestamp(arrow::datatypes::TimeUnit::Nanosecond, None),
        )?;
        let times = times
            .as_any()
            .downcast_ref::<TimestampNanosecondArray>()
            .ok_or_else(|| Error::Internal("pane column is not a timestamp".into()))?;
        Ok(times
            .iter()
            .map(|t| t.unwrap_or(i64::MIN).saturating_sub(offset))
            .collect())
    }

    /// Pane rows whose start lies in `[lo, hi)`.
    fn panes_between(&self, panes: &[RecordBatch], lo: i64, hi: i64) -> Result<Vec<RecordBatch>> {
        let mut out = Vec::new();
        for batch in panes {
            let starts = self.pane_starts(batch)?;
            let mask = BooleanArray::from(
                starts
                    .iter()
                    .map(|s| *s >= lo && *s < hi)
                    .collect::<Vec<_>>(),
            );
            let kept = filter_record_batch(batch, &mask)?;
            if kept.num_rows() > 0 {
                out.push(kept);
            }
        }
        Ok(out)
    }

    /// Rewrites accumulator rows: window columns cleared or set, accumulators negated.
    fn reshape(
        &self,
        rows: &[RecordBatch],
        windows: WindowColumns,
        negate: bool,
    ) -> Result<Vec<RecordBatch>> {
        let aggregate = self.aggregate();
        let (_, size) = self.slide_nanos()?;
        rows.iter()
            .map(|batch| {
                let n = batch.num_rows();
                let columns = batch
                    .columns()
                    .iter()
                    .zip(self.state_schema.fields())
                    .enumerate()
                    .map(|(i, (column, field))| {
                        let value = match &windows {
                            WindowColumns::Cleared => None,
                            WindowColumns::Window { end } => Some(*end),
                        };
                        let window_value = if Some(i) == aggregate.window_start_key {
                            Some(value.map(|e| e.saturating_sub(size)))
                        } else if Some(i) == aggregate.window_end_key {
                            Some(value)
                        } else {
                            None
                        };
                        match window_value {
                            Some(v) => {
                                let stamps: ArrayRef =
                                    Arc::new(TimestampNanosecondArray::from(vec![v; n]));
                                Ok(arrow::compute::cast(&stamps, field.data_type())?)
                            }
                            None if negate && i >= self.keys => Ok(neg(column.as_ref())?),
                            None => Ok(column.clone()),
                        }
                    })
                    .collect::<Result<Vec<ArrayRef>>>()?;
                relabel(
                    &RecordBatch::try_new(batch.schema(), columns)?,
                    &self.state_schema,
                )
            })
            .collect()
    }

    /// Merges accumulator rows by group and drops groups left with no rows.
    async fn combine_live(
        &self,
        ctx: &SessionContext,
        rows: Vec<RecordBatch>,
    ) -> Result<Vec<RecordBatch>> {
        if rows.is_empty() {
            return Ok(rows);
        }
        let merged = self.combine(ctx, rows).await?;
        let rows_column = self
            .state_schema
            .fields()
            .len()
            .checked_sub(1)
            .ok_or_else(|| Error::Internal("state schema without columns".into()))?;
        let mut out = Vec::new();
        for batch in merged {
            let batch = relabel(&batch, &self.state_schema)?;
            let counts = batch.column(rows_column);
            let zero = arrow::array::Scalar::new(Int64Array::from(vec![0]));
            // A NULL count (no rows) compares as NULL, which the filter drops.
            let live = gt(counts, &zero)?;
            let kept = filter_record_batch(&batch, &live)?;
            if kept.num_rows() > 0 {
                out.push(kept);
            }
        }
        Ok(out)
    }

    /// The reduce step in sliding mode: fold `delta` (pane partials) into the panes,
    /// then emit every window the watermark has closed, by add/subtract.
    pub(crate) async fn slide(
        &self,
        ctx: &SessionContext,
        prev: Arc<StatePartition>,
        delta: Vec<RecordBatch>,
        watermark: Option<i64>,
    ) -> Result<PartitionOutput> {
        let (slide, size) = self.slide_nanos()?;
        let panes = if delta.is_empty() {
            prev.table(ACCUMULATORS).to_vec()
        } else {
            let mut all = prev.table(ACCUMULATORS).to_vec();
            all.extend(delta);
            self.combine_live(ctx, all).await?
        };
        let mut running = prev.table(RUNNING).to_vec();
        let mut until = prev.emitted_until;
        let mut emitted = Vec::new();

        if let Some(wm) = watermark {
            let last_end = wm.div_euclid(slide).saturating_mul(slide);
            let mut starts: Vec<i64> = Vec::new();
            for batch in &panes {
                starts.extend(self.pane_starts(batch)?);
            }
            starts.sort_unstable();
            starts.dedup();
            // A window that would end past i64::MAX ends the walk (checked_add).
            let mut end = match (until, starts.first()) {
                (Some(u), _) => u.checked_add(slide),
                (None, Some(first)) => first.checked_add(slide),
                (None, None) => None,
            };
            while let Some(e) = end.filter(|e| *e <= last_end) {
                if running.is_empty() {
                    // Assemble the window from its panes; skip stretches without any.
                    let start = e.saturating_sub(size);
                    match starts.iter().find(|s| **s >= start) {
                        Some(next) if *next < e => {
                            let window = self.panes_between(&panes, start, e)?;
                            let window = self.reshape(&window, WindowColumns::Cleared, false)?;
                            running = self.combine_live(ctx, window).await?;
                        }
                        Some(next) => {
                            end = next.checked_add(slide);
                            continue;
                        }
                        None => break,
                    }
                } else {
                    let start = e.saturating_sub(size);
                    let newest = self.panes_between(&panes, e.saturating_sub(slide), e)?;
                    let expired = self.panes_between(&panes, start.saturating_sub(slide), start)?;
                    let mut rows = running;
                    rows.extend(self.reshape(&newest, WindowColumns::Cleared, false)?);
                    rows.extend(self.reshape(&expired, WindowColumns::Cleared, true)?);
                    running = self.combine_live(ctx, rows).await?;
                }
                if !running.is_empty() {
                    let window = self.reshape(&running, WindowColumns::Window { end: e }, false)?;
                    emitted.extend(self.view(ctx, window).await?);
                }
                until = Some(e);
                end = e.checked_add(slide);
            }
        }

        // Keep the panes the next windows still add or subtract.
        let panes = match until {
            Some(u) => self.panes_between(&panes, u.saturating_sub(size), i64::MAX)?,
            None => panes,
        };
        let mut state = StatePartition {
            emitted_until: until,
            watermark,
            ..StatePartition::default()
        };
        state.set(ACCUMULATORS, panes);
        state.set(RUNNING, running);
        Ok(PartitionOutput {
            state: Arc::new(state),
            view: ViewUpdate::Append(emitted.clone()),
            changelog: Changelog {
                deletes: vec![],
                inserts: emitted,
            },
        })
    }
}
