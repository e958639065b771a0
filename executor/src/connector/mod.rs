//! Connectors: where a source's records come from.
//!
//! A connector is opened as a [`Receiver`]. At every interval boundary the coordinator
//! *seals* the interval: each receiver hands over the records that arrived for it,
//! which become the interval's block. Receivers check their options when opened, so a
//! `CREATE SOURCE` with a bad option fails at once with a message naming the option.
//!
//! Connectors: [`generator`], [`nexmark`], [`tcp`], [`file`]; [`decode`] holds the
//! JSON/CSV decoding and malformed-record policy they share.

use std::collections::BTreeMap;

use arrow::array::RecordBatch;
use dstream_planner::SourceDef;
use dstream_storage::{IntervalId, Timeline};

use crate::error::{Result, config_error};

pub mod decode;
pub mod file;
pub mod generator;
pub mod nexmark;
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

/// Opens the receiver of `source`, checking its options.
pub fn open_receiver(source: &SourceDef) -> Result<Box<dyn Receiver>> {
    let options = Options::new(&source.connector.options);
    let receiver: Box<dyn Receiver> = match source.connector.connector.as_str() {
        "generator" | "datagen" => Box::new(generator::Generator::open(source, &options)?),
        "nexmark" => Box::new(nexmark::NexmarkReceiver::open(source, &options)?),
        "tcp" => Box::new(tcp::TcpReceiver::open(source, &options)?),
        "file" => Box::new(file::FileReceiver::open(source, &options)?),
        other => {
            return Err(config_error(format!(
                "unknown connector '{other}'; available: generator, nexmark, tcp, file"
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
