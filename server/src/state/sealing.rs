//! [`Sealing`]: what the receivers sealed of one interval, across attempts.

use std::collections::{BTreeMap, HashMap};

use dstream_executor::rpc::proto;
use dstream_storage::IntervalId;

use super::source::{SourceSlot, SplitPosition};

/// The receivers that sealed an interval, and what they were told.
#[derive(Debug)]
pub struct Sealing {
    pub interval: IntervalId,
    /// Each source's watermark after the previous interval.
    pub watermarks: HashMap<String, i64>,
    /// What each receiver sealed, by (source, split).
    pub splits: HashMap<(String, u32), proto::SealedSource>,
    /// Workers whose seal failed (not lost: they answered with an error), and the
    /// error. Their receivers' sources fail when the interval runs, not before: a seal
    /// ahead that fails leaves the interval in progress, and its checkpoint, alone.
    pub failed: Vec<(u64, String)>,
}

impl Sealing {
    /// `interval` before any receiver sealed it, against each source's watermark now.
    pub fn new(interval: IntervalId, sources: &BTreeMap<String, SourceSlot>) -> Self {
        Sealing {
            interval,
            // Every attempt drops late rows against the same watermarks.
            watermarks: sources
                .iter()
                .filter_map(|(name, s)| s.stats.watermark.map(|w| (name.clone(), w)))
                .collect(),
            splits: HashMap::new(),
            failed: Vec::new(),
        }
    }

    /// Where receiver `split` of `source` stands after this seal, from `before`.
    pub fn position_after(&self, source: &str, split: u32, before: SplitPosition) -> SplitPosition {
        let mut position = before;
        if let Some(sealed) = self.splits.get(&(source.to_string(), split)) {
            position.advance(sealed);
        }
        position
    }

    /// Where receiver `split` of `source` stands after each of `sealed` in turn, from
    /// `before`.
    pub fn position_after_each<'a>(
        sealed: impl IntoIterator<Item = &'a Sealing>,
        source: &str,
        split: u32,
        before: SplitPosition,
    ) -> SplitPosition {
        sealed.into_iter().fold(before, |position, s| {
            s.position_after(source, split, position)
        })
    }

    /// Forgets what `source`'s receivers sealed.
    pub fn forget(&mut self, source: &str) {
        self.splits.retain(|(name, _), _| name != source);
        self.watermarks.remove(source);
    }
}
