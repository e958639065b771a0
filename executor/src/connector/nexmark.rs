//! The `nexmark` connector: the person, auction and bid streams of the Nexmark
//! benchmark, from the `nexmark` crate's generator.
//!
//! Options: `nexmark.table` (`person`, `auction` or `bid`, required) and
//! `nexmark.event_rate` (events per second over all three streams, default 10000).
//! Event *n* of the whole Nexmark stream belongs to the interval its number falls in
//! (rate × interval width events per interval), and its `date_time` is the interval
//! timeline's start plus n / rate seconds, so sources of the three tables with the
//! same rate line up, and every run produces the same intervals.
//!
//! Declare the columns you need, by their Nexmark names: person (`id`, `name`,
//! `email_address`, `credit_card`, `city`, `state`, `date_time`, `extra`), auction
//! (`id`, `item_name`, `description`, `initial_bid`, `reserve`, `date_time`, `expires`,
//! `seller`, `category`, `extra`), bid (`auction`, `bidder`, `price`, `channel`, `url`,
//! `date_time`, `extra`).

use std::sync::Arc;

use arrow::array::{
    ArrayRef, Int64Builder, RecordBatch, StringBuilder, TimestampMillisecondBuilder,
};
use arrow::datatypes::{DataType, SchemaRef};
use dstream_planner::SourceDef;
use dstream_storage::{IntervalId, Timeline};
use nexmark::EventGenerator;
use nexmark::config::{NexmarkConfig, RateShape};
use nexmark::event::Event;

use crate::connector::{Options, Receiver, ReceiverPosition, ReceiverStats, Split};
use crate::error::{Result, config_error};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Table {
    Person,
    Auction,
    Bid,
}

impl Table {
    fn columns(self) -> &'static [(&'static str, Kind)] {
        use Kind::*;
        match self {
            Table::Person => &[
                ("id", Int),
                ("name", Text),
                ("email_address", Text),
                ("credit_card", Text),
                ("city", Text),
                ("state", Text),
                ("date_time", Time),
                ("extra", Text),
            ],
            Table::Auction => &[
                ("id", Int),
                ("item_name", Text),
                ("description", Text),
                ("initial_bid", Int),
                ("reserve", Int),
                ("date_time", Time),
                ("expires", Time),
                ("seller", Int),
                ("category", Int),
                ("extra", Text),
            ],
            Table::Bid => &[
                ("auction", Int),
                ("bidder", Int),
                ("price", Int),
                ("channel", Text),
                ("url", Text),
                ("date_time", Time),
                ("extra", Text),
            ],
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Int,
    Text,
    Time,
}

/// One field of an event, by column position in the Nexmark table.
enum Value<'a> {
    Int(i64),
    Text(&'a str),
    Time(u64),
}

fn field(event: &Event, index: usize) -> Option<Value<'_>> {
    Some(match event {
        Event::Person(p) => match index {
            0 => Value::Int(p.id as i64),
            1 => Value::Text(&p.name),
            2 => Value::Text(&p.email_address),
            3 => Value::Text(&p.credit_card),
            4 => Value::Text(&p.city),
            5 => Value::Text(&p.state),
            6 => Value::Time(p.date_time),
            7 => Value::Text(&p.extra),
            _ => return None,
        },
        Event::Auction(a) => match index {
            0 => Value::Int(a.id as i64),
            1 => Value::Text(&a.item_name),
            2 => Value::Text(&a.description),
            3 => Value::Int(a.initial_bid as i64),
            4 => Value::Int(a.reserve as i64),
            5 => Value::Time(a.date_time),
            6 => Value::Time(a.expires),
            7 => Value::Int(a.seller as i64),
            8 => Value::Int(a.category as i64),
            9 => Value::Text(&a.extra),
            _ => return None,
        },
        Event::Bid(b) => match index {
            0 => Value::Int(b.auction as i64),
            1 => Value::Int(b.bidder as i64),
            2 => Value::Int(b.price as i64),
            3 => Value::Text(&b.channel),
            4 => Value::Text(&b.url),
            5 => Value::Time(b.date_time),
            6 => Value::Text(&b.extra),
            _ => return None,
        },
    })
}

/// Generates one Nexmark table.
#[derive(Debug)]
pub struct NexmarkReceiver {
    table: Table,
    schema: SchemaRef,
    /// For each declared column, its index in the Nexmark table.
    columns: Vec<usize>,
    event_rate: f64,
    split: Split,
    stats: ReceiverStats,
}

impl NexmarkReceiver {
    /// Makes this receiver generate only `split`'s share of each interval's events.
    pub fn split(mut self, split: Split) -> Self {
        self.split = split;
        self
    }

    pub fn open(source: &SourceDef, options: &Options) -> Result<Self> {
        let table = match options.get("nexmark.table") {
            Some("person") => Table::Person,
            Some("auction") => Table::Auction,
            Some("bid") => Table::Bid,
            Some(other) => {
                return Err(config_error(format!(
                    "nexmark.table = '{other}' is unknown; use person, auction or bid"
                )));
            }
            None => {
                return Err(config_error(
                    "the nexmark connector needs nexmark.table = 'person', 'auction' or 'bid'",
                ));
            }
        };
        let event_rate: f64 = options.number("nexmark.event_rate", 10_000.0)?;
        if !(event_rate.is_finite() && event_rate > 0.0) {
            return Err(config_error("nexmark.event_rate must be positive"));
        }
        let known = table.columns();
        let mut columns = Vec::new();
        for f in source.record_schema.fields() {
            let (index, (_, kind)) = known
                .iter()
                .enumerate()
                .find(|(_, (name, _))| name == f.name())
                .ok_or_else(|| {
                    config_error(format!(
                        "nexmark {:?} events have no column {}; they have {}",
                        table,
                        f.name(),
                        known.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
                    ))
                })?;
            let ok = match kind {
                Kind::Int => matches!(f.data_type(), DataType::Int64),
                Kind::Text => matches!(f.data_type(), DataType::Utf8),
                Kind::Time => matches!(f.data_type(), DataType::Timestamp(_, None)),
            };
            if !ok {
                return Err(config_error(format!(
                    "nexmark column {} must be {}",
                    f.name(),
                    match kind {
                        Kind::Int => "BIGINT",
                        Kind::Text => "TEXT",
                        Kind::Time => "TIMESTAMP",
                    }
                )));
            }
            columns.push(index);
        }
        Ok(NexmarkReceiver {
            table,
            schema: source.record_schema.clone(),
            columns,
            event_rate,
            split: Split::WHOLE,
            stats: ReceiverStats::default(),
        })
    }

    fn events_before(&self, interval: IntervalId, timeline: &Timeline) -> u64 {
        let secs = timeline.width_nanos as f64 / 1e9;
        (interval.0 as f64 * self.event_rate * secs).floor() as u64
    }

    fn generator(&self, timeline: &Timeline, offset: u64) -> EventGenerator {
        let rate = self.event_rate.round().max(1.0) as usize;
        let config = NexmarkConfig {
            base_time: (timeline.origin_nanos / 1_000_000).max(0) as u64,
            first_rate: rate,
            next_rate: rate,
            rate_shape: RateShape::Square,
            ..NexmarkConfig::default()
        };
        EventGenerator::new(config).with_offset(offset)
    }
}

impl Receiver for NexmarkReceiver {
    fn seal(&mut self, interval: IntervalId, timeline: &Timeline) -> Result<Vec<RecordBatch>> {
        let first = self.events_before(interval, timeline);
        let end = self.events_before(interval.next(), timeline);
        let mine = self.split.share(first, end);
        let events: Vec<Event> = self
            .generator(timeline, mine.start)
            .take(mine.end.saturating_sub(mine.start) as usize)
            .filter(|e| {
                matches!(
                    (self.table, e),
                    (Table::Person, Event::Person(_))
                        | (Table::Auction, Event::Auction(_))
                        | (Table::Bid, Event::Bid(_))
                )
            })
            .collect();
        if events.is_empty() {
            return Ok(vec![]);
        }
        let mut arrays: Vec<ArrayRef> = Vec::with_capacity(self.columns.len());
        for (f, &index) in self.schema.fields().iter().zip(&self.columns) {
            let array: ArrayRef = match f.data_type() {
                DataType::Int64 => {
                    let mut b = Int64Builder::with_capacity(events.len());
                    for e in &events {
                        match field(e, index) {
                            Some(Value::Int(v)) => b.append_value(v),
                            _ => b.append_null(),
                        }
                    }
                    Arc::new(b.finish())
                }
                DataType::Utf8 => {
                    let mut b = StringBuilder::new();
                    for e in &events {
                        match field(e, index) {
                            Some(Value::Text(v)) => b.append_value(v),
                            _ => b.append_null(),
                        }
                    }
                    Arc::new(b.finish())
                }
                other => {
                    let mut b = TimestampMillisecondBuilder::with_capacity(events.len());
                    for e in &events {
                        match field(e, index) {
                            Some(Value::Time(ms)) => b.append_value(ms as i64),
                            _ => b.append_null(),
                        }
                    }
                    let millis: ArrayRef = Arc::new(b.finish());
                    arrow::compute::cast(&millis, other)?
                }
            };
            arrays.push(array);
        }
        self.stats.records = self.stats.records.saturating_add(events.len() as u64);
        Ok(vec![RecordBatch::try_new(self.schema.clone(), arrays)?])
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
