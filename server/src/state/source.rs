//! A live source: [`SourceSlot`], where its receivers run and what they have sealed.

use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;

use dstream_executor::SourceStats;
use dstream_executor::rpc::proto;
use dstream_planner::SourceDef;
use dstream_storage::IntervalId;

use dstream_executor::connector::push::PushOptions;

use super::inbox::Inbox;
use super::input::{BlockInfo, SealedInterval};
use super::placement::Placement;
use super::sealing::Sealing;

/// Where one receiver of a source stood after the last interval it sealed: enough
/// to reopen it on another worker if its worker dies.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SplitPosition {
    pub records: u64,
    pub malformed: u64,
    pub late_rows: u64,
    pub watermark: Option<i64>,
    /// File sources: the files read.
    pub seen_files: BTreeSet<String>,
    /// Pushed sources: the position in the source's inbox after the bodies sealed
    /// (see [`super::inbox::Inbox`]). Not checkpointed: an inbox starts at 0.
    pub pushed_until: u64,
}

impl SplitPosition {
    /// What a worker needs to open receiver `split` (of `splits`) of `source` here.
    pub fn handover(&self, source: &str, split: u32, splits: u32) -> proto::ReceiverHandover {
        proto::ReceiverHandover {
            source: source.to_string(),
            split,
            splits,
            records: self.records,
            malformed: self.malformed,
            late_rows: self.late_rows,
            watermark: self.watermark,
            seen_files: self.seen_files.iter().cloned().collect(),
            pending: Vec::new(),
        }
    }

    /// Moves past `sealed`, the receiver's next seal.
    pub fn advance(&mut self, sealed: &proto::SealedSource) {
        self.records = sealed.records;
        self.malformed = sealed.malformed;
        self.late_rows = sealed.late_rows;
        self.watermark = sealed.watermark;
        self.seen_files.extend(sealed.new_files.iter().cloned());
        self.pushed_until = self.pushed_until.max(sealed.pushed_until);
    }
}

/// A source: its definition, where its receiver runs and what it has seen.
#[derive(Debug)]
pub struct SourceSlot {
    pub def: Arc<SourceDef>,
    /// The worker running each of the source's receivers (its splits), once placed.
    pub receivers: Placement,
    /// Where each receiver stood after the last interval whose input was recorded
    /// (an interval sealed ahead counts once it runs: see `position`).
    pub positions: Vec<SplitPosition>,
    pub stats: SourceStats,
    pub failure: Option<String>,
    /// The input of recent intervals, oldest first: the last `retain_intervals` (for
    /// ad-hoc reads of the raw stream) and every one recovery may replay (the
    /// lineage since the latest checkpoint).
    pub retained: VecDeque<SealedInterval>,
    pub retain_intervals: usize,
    /// The first interval the source is sealed in (the one after its creation);
    /// `None` when unknown (restored without a checkpoint: from the start).
    pub since: Option<IntervalId>,
    /// A pushed (`http`) source's records accepted and not yet sealed.
    pub inbox: Option<Arc<Inbox>>,
}

impl SourceSlot {
    /// Where receiver `split` of this source (`name`) stands: after its latest seal,
    /// including those `sealed` (the interval in progress, then the one sealed ahead)
    /// that its positions do not count yet. Moving past a seal twice changes nothing.
    pub fn position<'a>(
        &self,
        name: &str,
        split: u32,
        sealed: impl IntoIterator<Item = &'a Sealing>,
    ) -> SplitPosition {
        let before = self
            .positions
            .get(split as usize)
            .cloned()
            .unwrap_or_default();
        Sealing::position_after_each(sealed, name, split, before)
    }

    pub fn new(def: Arc<SourceDef>, retain_intervals: usize) -> Self {
        // Bad options leave no inbox: opening the receiver refuses them.
        let inbox = (def.connector.connector == "http")
            .then(|| PushOptions::of(&def).ok())
            .flatten()
            .map(|options| Arc::new(Inbox::new(def.clone(), options)));
        SourceSlot {
            inbox,
            since: None,
            def,
            receivers: Placement::default(),
            positions: Vec::new(),
            stats: SourceStats::default(),
            failure: None,
            retained: VecDeque::new(),
            retain_intervals: retain_intervals.max(1),
        }
    }

    /// Records the input of an interval (again, if an earlier attempt of it did) and
    /// forgets intervals that are neither retained nor from `lineage` on.
    pub fn retain(&mut self, sealed: SealedInterval, lineage: Option<IntervalId>) {
        if self
            .retained
            .back()
            .is_some_and(|s| s.interval == sealed.interval)
        {
            self.retained.pop_back();
        }
        self.retained.push_back(sealed);
        while self.retained.len() > self.retain_intervals
            && self
                .retained
                .front()
                .is_some_and(|s| lineage.is_none_or(|l| s.interval < l))
        {
            self.retained.pop_front();
        }
    }

    /// The input of `interval`, if still held.
    pub fn input_of(&self, interval: IntervalId) -> Option<&SealedInterval> {
        self.retained.iter().find(|s| s.interval == interval)
    }

    /// The blocks of the last `retain_intervals` intervals, for ad-hoc reads.
    pub fn recent_blocks(&self) -> Vec<BlockInfo> {
        let skip = self.retained.len().saturating_sub(self.retain_intervals);
        self.retained
            .iter()
            .skip(skip)
            .flat_map(|s| s.blocks.iter().cloned())
            .collect()
    }
}
