//! The `generator` connector: deterministic, seeded synthetic records.
//!
//! Record *i* of the source is a pure function of (seed, i), and interval *t* holds
//! records `[floor(t·r·w), floor((t+1)·r·w))` for `r = rows_per_second` and interval
//! width `w` — so two runs of the same source produce identical intervals, which is
//! what the recovery and differential tests rely on.
//!
//! Options:
//! - `rows_per_second` (default 1000)
//! - `seed` (default 0)
//! - `key_cardinality` (default 1000): integer and text columns take values in
//!   `[0, key_cardinality)`; per column `fields.<col>.cardinality` overrides it.
//! - `fields.<col>.kind = 'sequence'`: the column is the record number instead.
//! - `max_out_of_orderness` (default `0s`): timestamp columns are the record's
//!   arrival time minus a random delay of up to this much, so event times arrive out of
//!   order.

use std::fmt::Write;
use std::num::NonZeroU64;
use std::sync::Arc;
use std::time::Duration;

use arrow::array::{
    ArrayRef, BooleanArray, Float32Array, Float64Array, Int16Array, Int32Array, Int64Array,
    RecordBatch, StringBuilder,
};
use arrow::datatypes::{DataType, SchemaRef, TimeUnit};
use dstream_planner::SourceDef;
use dstream_planner::duration::parse_duration;
use dstream_storage::{IntervalId, Timeline};

use crate::connector::{Options, Receiver, ReceiverPosition, ReceiverStats, Split};
use crate::error::{Result, config_error};

/// Largest batch the generator builds at once.
const BATCH_ROWS: u64 = 8192;

#[derive(Clone, Debug)]
enum ColumnGen {
    Sequence,
    Uniform { cardinality: NonZeroU64 },
    EventTime,
}

/// A seeded generator of records.
#[derive(Debug)]
pub struct Generator {
    schema: SchemaRef,
    columns: Vec<ColumnGen>,
    rows_per_second: f64,
    seed: u64,
    max_delay_nanos: i64,
    split: Split,
    stats: ReceiverStats,
}

/// SplitMix64: a tiny, high-quality, stable mixing function.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Generator {
    /// Makes this receiver generate only `split`'s share of each interval's rows.
    pub fn split(mut self, split: Split) -> Self {
        self.split = split;
        self
    }

    pub fn open(source: &SourceDef, options: &Options) -> Result<Self> {
        let rows_per_second: f64 = options.number("rows_per_second", 1000.0)?;
        if !(rows_per_second.is_finite() && rows_per_second >= 0.0) {
            return Err(config_error(
                "rows_per_second must be a non-negative number",
            ));
        }
        let seed: u64 = options.number("seed", 0)?;
        let default_cardinality: u64 = options.number("key_cardinality", 1000)?;
        let max_delay = match options.get("max_out_of_orderness") {
            Some(v) => parse_duration(v).or_else(|_| {
                if v.trim() == "0" {
                    Ok(Duration::ZERO)
                } else {
                    Err(config_error(format!(
                        "option max_out_of_orderness = '{v}' is not a duration such as '2s'"
                    )))
                }
            })?,
            None => Duration::ZERO,
        };
        let schema = source.record_schema.clone();
        let mut columns = Vec::new();
        for field in schema.fields() {
            let name = field.name();
            let kind = options.get(&format!("fields.{name}.kind"));
            let cardinality: u64 =
                options.number(&format!("fields.{name}.cardinality"), default_cardinality)?;
            let Some(cardinality) = NonZeroU64::new(cardinality) else {
                return Err(config_error(format!(
                    "fields.{name}.cardinality must be positive"
                )));
            };
            let column_gen = match (kind, field.data_type()) {
                (
                    Some("sequence"),
                    DataType::Int16 | DataType::Int32 | DataType::Int64 | DataType::Utf8,
                ) => ColumnGen::Sequence,
                (Some("sequence"), other) => {
                    return Err(config_error(format!(
                        "fields.{name}.kind = 'sequence' needs an integer or text column, not {other}"
                    )));
                }
                (Some("random") | None, DataType::Timestamp(_, _)) => ColumnGen::EventTime,
                (Some("random") | None, _) => ColumnGen::Uniform { cardinality },
                (Some(other), _) => {
                    return Err(config_error(format!(
                        "fields.{name}.kind = '{other}' is unknown; use 'sequence' or 'random'"
                    )));
                }
            };
            if !matches!(
                field.data_type(),
                DataType::Int16
                    | DataType::Int32
                    | DataType::Int64
                    | DataType::Float32
                    | DataType::Float64
                    | DataType::Utf8
                    | DataType::Boolean
                    | DataType::Timestamp(_, None)
            ) {
                return Err(config_error(format!(
                    "the generator cannot produce column {name} of type {}",
                    field.data_type()
                )));
            }
            columns.push(column_gen);
        }
        Ok(Generator {
            schema,
            columns,
            rows_per_second,
            seed,
            max_delay_nanos: max_delay.as_nanos() as i64,
            split: Split::WHOLE,
            stats: ReceiverStats::default(),
        })
    }

    fn rows_before(&self, interval: IntervalId, timeline: &Timeline) -> u64 {
        let secs = timeline.width_nanos as f64 / 1e9;
        (interval.0 as f64 * self.rows_per_second * secs).floor() as u64
    }

    fn value(&self, column: usize, row: u64) -> u64 {
        mix(self.seed ^ mix(row ^ ((column as u64).wrapping_add(1) << 48)))
    }

    /// Rows `rows` of an interval whose first row is `first` and which starts at
    /// `start`; rows arrive every `step` nanoseconds.
    fn build(
        &self,
        rows: std::ops::Range<u64>,
        first: u64,
        start: i64,
        step: f64,
    ) -> Result<RecordBatch> {
        let n = rows.end.saturating_sub(rows.start) as usize;
        let mut arrays: Vec<ArrayRef> = Vec::with_capacity(self.columns.len());
        for (c, (field, column_gen)) in self.schema.fields().iter().zip(&self.columns).enumerate() {
            let ints = |row: u64| -> u64 {
                match column_gen {
                    ColumnGen::Sequence => row,
                    ColumnGen::Uniform { cardinality } => self.value(c, row) % *cardinality,
                    ColumnGen::EventTime => 0,
                }
            };
            let time = |row: u64| -> i64 {
                let arrival =
                    start.saturating_add((row.saturating_sub(first) as f64 * step) as i64);
                let delay = if self.max_delay_nanos > 0 {
                    self.value(c, row)
                        .checked_rem(self.max_delay_nanos as u64)
                        .unwrap_or(0) as i64
                } else {
                    0
                };
                arrival.saturating_sub(delay)
            };
            let array: ArrayRef = match field.data_type() {
                DataType::Int16 => Arc::new(Int16Array::from(
                    rows.clone().map(|r| ints(r) as i16).collect::<Vec<_>>(),
                )),
                DataType::Int32 => Arc::new(Int32Array::from(
                    rows.clone().map(|r| ints(r) as i32).collect::<Vec<_>>(),
                )),
                DataType::Int64 => Arc::new(Int64Array::from(
                    rows.clone().map(|r| ints(r) as i64).collect::<Vec<_>>(),
                )),
                DataType::Float32 => Arc::new(Float32Array::from(
                    rows.clone()
                        .map(|r| (self.value(c, r) % 100_000) as f32 / 100.0)
                        .collect::<Vec<_>>(),
                )),
                DataType::Float64 => Arc::new(Float64Array::from(
                    rows.clone()
                        .map(|r| (self.value(c, r) % 100_000) as f64 / 100.0)
                        .collect::<Vec<_>>(),
                )),
                DataType::Boolean => Arc::new(BooleanArray::from(
                    rows.clone()
                        .map(|r| self.value(c, r) & 1 == 1)
                        .collect::<Vec<_>>(),
                )),
                DataType::Utf8 => {
                    let mut b = StringBuilder::with_capacity(n, n.saturating_mul(8));
                    for r in rows.clone() {
                        // Write into the builder's buffer; no string per value.
                        let _ = write!(b, "k{}", ints(r));
                        b.append_value("");
                    }
                    Arc::new(b.finish())
                }
                DataType::Timestamp(unit, None) => {
                    let in_unit = |nanos: i64| match unit {
                        TimeUnit::Nanosecond => nanos,
                        TimeUnit::Microsecond => nanos / 1_000,
                        TimeUnit::Millisecond => nanos / 1_000_000,
                        TimeUnit::Second => nanos / 1_000_000_000,
                    };
                    let values = Int64Array::from(
                        rows.clone().map(|r| in_unit(time(r))).collect::<Vec<_>>(),
                    );
                    arrow::compute::cast(&values, field.data_type())?
                }
                other => {
                    return Err(config_error(format!("generator cannot produce {other}")));
                }
            };
            arrays.push(array);
        }
        Ok(RecordBatch::try_new(self.schema.clone(), arrays)?)
    }
}

impl Receiver for Generator {
    fn seal(&mut self, interval: IntervalId, timeline: &Timeline) -> Result<Vec<RecordBatch>> {
        let first = self.rows_before(interval, timeline);
        let end = self.rows_before(interval.next(), timeline);
        let n = end.saturating_sub(first);
        let start = timeline.start_nanos(interval);
        let step = if n == 0 {
            0.0
        } else {
            timeline.width_nanos as f64 / n as f64
        };
        let mine = self.split.share(first, end);
        let mut batches = Vec::new();
        let mut lo = mine.start;
        while lo < mine.end {
            let hi = lo.saturating_add(BATCH_ROWS).min(mine.end);
            batches.push(self.build(lo..hi, first, start, step)?);
            lo = hi;
        }
        self.stats.records = self
            .stats
            .records
            .saturating_add(mine.end.saturating_sub(mine.start));
        Ok(batches)
    }

    fn stats(&self) -> ReceiverStats {
        self.stats
    }

    fn release(&mut self) -> ReceiverPosition {
        ReceiverPosition::counters(self.stats)
    }

    fn resume(&mut self, position: ReceiverPosition) {
        self.stats = position.stats;
    }
}
