//! Connectors: where a source's records come from.
//!
//! A connector is opened as a [`Receiver`]. At every interval boundary the coordinator
//! *seals* the interval: each receiver hands over the records that arrived for it,
//! which become the interval's block. Receivers check their options when opened, so a
//! `CREATE SOURCE` with a bad option fails at once with a message naming the option.
//!
//! Connectors: [`generator`], [`nexmark`], [`tcp`], [`file`], and [`push`] (`http`:
//! records pushed to the coordinator); [`decode`] holds the
//! JSON/CSV decoding and malformed-record policy they share.

use std::collections::BTreeMap;

use arrow::array::RecordBatch;
use dstream_planner::SourceDef;
use dstream_storage::{IntervalId, Timeline};

use crate::error::{Error, Result, config_error};

pub mod decode;
pub mod file;
pub mod generator;
pub mod nexmark;
pub mod push;
pub mod tcp;

/// Counters a receiver keeps about the records it saw.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReceiverStats {
    /// Records accepted.
    pub records: u64,
    /// Malformed records skipped (under `on_error = 'skip'`).
    pub malformed: u64,
}

/// The receiving end of one source.
pub trait Receiver: Send + Sync + std::fmt::Debug {
    /// Returns the records that arrived for `interval`, in the source's record schema
    /// (declared columns, without `_interval`). Called once per interval, in order.
    fn seal(&mut self, interval: IntervalId, timeline: &Timeline) -> Result<Vec<RecordBatch>>;

    /// What the receiver has seen so far.
    fn stats(&self) -> ReceiverStats;

    /// Stops receiving and says where the receiver stood, so that a receiver opened
    /// on another worker can carry on from there (see [`Receiver::resume`]).
    fn release(&mut self) -> ReceiverPosition;

    /// Carries on from where a released receiver stood. Called right after opening.
    fn resume(&mut self, position: ReceiverPosition);

    /// File sources: the files read since the last call, so that the coordinator
    /// knows where the receiver stands after every interval (and can reopen it
    /// elsewhere if its worker dies).
    fn take_new_files(&mut self) -> Vec<String> {
        Vec::new()
    }

    /// Pushed sources: takes records the coordinator accepted (and `malformed`
    /// records it dropped), to seal in the interval being sealed.
    fn push(&mut self, _batches: Vec<RecordBatch>, _malformed: u64) -> Result<()> {
        Err(Error::Internal(
            "records were pushed to a source whose connector reads them itself".into(),
        ))
    }
}

/// Where a receiver stood when it was released: what it counted, what it already
/// read, and input it received but had not sealed yet.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReceiverPosition {
    pub stats: ReceiverStats,
    /// File sources: the files already read.
    pub seen_files: Vec<String>,
    /// Raw input not sealed yet (text lines of a tcp source).
    pub pending: Vec<u8>,
}

impl ReceiverPosition {
    /// Only the counters: for receivers whose records are a function of the interval.
    pub fn counters(stats: ReceiverStats) -> Self {
        ReceiverPosition {
            stats,
            ..Default::default()
        }
    }
}

/// One of the parallel receivers of a source: receiver `index` of `count` reads its
/// share of the records, so a source's ingest spreads over workers. Only connectors
/// whose records are a function of their position split ([`splittable`]); the others
/// always run as one receiver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Split {
    pub index: u32,
    pub count: u32,
}

impl Split {
    /// The only receiver of its source.
    pub const WHOLE: Split = Split { index: 0, count: 1 };

    /// This split's share of the positions `first..end`: a contiguous range, so the
    /// splits' shares in index order are the whole range in order.
    // Bounds first + n·i/count for i <= count, in u128: n·i cannot overflow and the
    // bound is at most end.
    #[allow(clippy::arithmetic_side_effects)]
    pub fn share(&self, first: u64, end: u64) -> std::ops::Range<u64> {
        let n = u128::from(end.saturating_sub(first));
        let count = u128::from(self.count.max(1));
        let index = u128::from(self.index.min(self.count.saturating_sub(1)));
        let bound = |i: u128| first + (n * i / count) as u64;
        bound(index)..bound(index + 1)
    }
}

/// Whether the records `source` delivers in an interval are a function of the interval
/// and the split alone, so that any worker can seal that interval again and get the
/// same blocks (see [`crate::ingest::SourceRuntime::replay`]).
pub fn replayable(source: &SourceDef) -> bool {
    matches!(
        source.connector.connector.as_str(),
        "generator" | "datagen" | "nexmark"
    )
}

/// Whether the connector of `source` can run as several receivers: the replayable
/// ones, whose splits each take a share of every interval's records.
pub fn splittable(source: &SourceDef) -> bool {
    replayable(source)
}

/// Opens receiver `split` of `source`, checking its options.
pub fn open_receiver(source: &SourceDef, split: Split) -> Result<Box<dyn Receiver>> {
    let options = Options::new(&source.connector.options);
    if split.count > 1 && !splittable(source) {
        return Err(Error::Internal(format!(
            "source {} cannot run as {} receivers",
            source.name, split.count
        )));
    }
    let receiver: Box<dyn Receiver> = match source.connector.connector.as_str() {
        "generator" | "datagen" => {
            Box::new(generator::Generator::open(source, &options)?.split(split))
        }
        "nexmark" => Box::new(nexmark::NexmarkReceiver::open(source, &options)?.split(split)),
        "tcp" => Box::new(tcp::TcpReceiver::open(source, &options)?),
        "file" => Box::new(file::FileReceiver::open(source, &options)?),
        "http" => Box::new(push::PushReceiver::open(&options)?),
        other => {
            return Err(config_error(format!(
                "unknown connector '{other}'; available: generator, nexmark, tcp, file, http"
            )));
        }
    };
    options.check_all_used(&source.connector.connector)?;
    Ok(receiver)
}

/// A connector's `WITH` options, remembering which ones were read so that unknown
/// (misspelled) options are reported instead of ignored.
#[derive(Debug)]
pub struct Options<'a> {
    values: &'a BTreeMap<String, String>,
    used: std::cell::RefCell<Vec<String>>,
}

impl<'a> Options<'a> {
    pub fn new(values: &'a BTreeMap<String, String>) -> Self {
        Options {
            values,
            used: std::cell::RefCell::new(vec!["connector".to_string()]),
        }
    }

    /// The raw value of `key`.
    pub fn get(&self, key: &str) -> Option<&'a str> {
        self.used.borrow_mut().push(key.to_string());
        self.values.get(key).map(String::as_str)
    }

    /// `key` parsed as a number, or `default` if absent.
    pub fn number<T: std::str::FromStr>(&self, key: &str, default: T) -> Result<T> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .trim()
                .parse()
                .map_err(|_| config_error(format!("option {key} = '{v}' is not a valid number"))),
        }
    }

    /// Fails if an option was given that no `get` asked for.
    pub fn check_all_used(&self, connector: &str) -> Result<()> {
        let used = self.used.borrow();
        let unknown: Vec<&String> = self
            .values
            .keys()
            .filter(|k| !used.iter().any(|u| u == *k))
            .collect();
        if unknown.is_empty() {
            return Ok(());
        }
        let names = unknown
            .iter()
            .map(|k| k.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        Err(config_error(format!(
            "unknown option(s) for connector '{connector}': {names}"
        )))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use arrow::compute::concat_batches;
    use datafusion::prelude::SessionContext;
    use dstream_planner::Statement;
    use dstream_planner::definition::source_def;
    use dstream_planner::statement::parse_statement;

    use super::*;

    #[test]
    fn shares_cover_the_range_in_order() {
        for count in 1..6u32 {
            let mut next = 10;
            for index in 0..count {
                let share = Split { index, count }.share(10, 27);
                assert_eq!(share.start, next, "split {index} of {count}");
                next = share.end;
            }
            assert_eq!(next, 27);
        }
    }

    fn seal_all(sql: &str, splits: u32) -> RecordBatch {
        let Ok(Statement::CreateSource(create)) = parse_statement(sql) else {
            panic!("not a source: {sql}");
        };
        let ctx = SessionContext::new();
        let def = futures::executor::block_on(source_def(&ctx.state(), &create)).expect("def");
        let timeline = Timeline::new(1_767_225_600_000_000_000, Duration::from_secs(1));
        let mut batches = Vec::new();
        for index in 0..splits {
            let split = Split {
                index,
                count: splits,
            };
            let mut receiver = open_receiver(&def, split).expect("open");
            for interval in 0..3 {
                batches.extend(
                    receiver
                        .seal(IntervalId(interval), &timeline)
                        .expect("seal"),
                );
            }
        }
        concat_batches(&def.record_schema, &batches).expect("concat")
    }

    fn sorted_rows(batch: &RecordBatch) -> Vec<String> {
        let mut rows: Vec<String> = (0..batch.num_rows())
            .map(|r| {
                batch
                    .columns()
                    .iter()
                    .map(|c| arrow::util::display::array_value_to_string(c, r).expect("value"))
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .collect();
        rows.sort();
        rows
    }

    #[test]
    fn the_splits_of_a_source_together_read_what_one_receiver_reads() {
        for sql in [
            "CREATE SOURCE g (k BIGINT, v DOUBLE, ts TIMESTAMP) WITH (connector = 'generator', rows_per_second = 1001, seed = 3)",
            "CREATE SOURCE b (auction BIGINT, price BIGINT) WITH (connector = 'nexmark', nexmark.table = 'bid', nexmark.event_rate = 997)",
        ] {
            let whole = seal_all(sql, 1);
            assert!(whole.num_rows() > 100, "{sql}");
            for splits in [2, 3] {
                let parts = seal_all(sql, splits);
                assert_eq!(
                    sorted_rows(&parts),
                    sorted_rows(&whole),
                    "{sql}, {splits} splits"
                );
            }
        }
    }

    #[test]
    fn a_source_that_cannot_split_says_so() {
        let Ok(Statement::CreateSource(create)) = parse_statement(
            "CREATE SOURCE t (a BIGINT) WITH (connector = 'tcp', port = 9, format = 'json')",
        ) else {
            panic!("not a source");
        };
        let ctx = SessionContext::new();
        let def = futures::executor::block_on(source_def(&ctx.state(), &create)).expect("def");
        assert!(!splittable(&def));
        let err = open_receiver(&def, Split { index: 0, count: 2 }).expect_err("no split");
        assert!(
            err.to_string().contains("cannot run as 2 receivers"),
            "{err}"
        );
    }
}
