//! [`StatePartitions`]: the state partitions a worker owns — each one's committed
//! state, the versions of its view rows that readers may still ask for, and the
//! output of a reduce task waiting for its interval's commit.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use arrow::array::RecordBatch;
use dstream_storage::IntervalId;
use tokio_util::sync::CancellationToken;

use super::lock;
use crate::operator::{StatePartition, ViewUpdate};
use crate::view_runtime::ViewPartition;
use crate::worker::checkpoint::TakenPartition;

/// How many committed versions of a view partition's rows a worker keeps, so that an
/// ad-hoc query that took its snapshot a few intervals ago can still read it.
pub const VERSIONS_KEPT: u64 = 16;

/// The state partitions held here, by (stage, partition); the only owner of them.
#[derive(Debug, Default)]
pub struct StatePartitions(Mutex<HashMap<(String, u32), PartitionSlot>>);

impl StatePartitions {
    /// The committed state of a partition (empty if the partition is new here).
    pub fn state(&self, view: &str, partition: u32) -> Arc<StatePartition> {
        lock(&self.0)
            .get(&(view.to_string(), partition))
            .map(|slot| slot.state.clone())
            .unwrap_or_default()
    }

    /// Stores a reduce task's output until its interval is committed, unless the task
    /// was abandoned (`cancel`): checked under the partitions' lock, which
    /// [`super::WorkerState::abandon`] also takes, so an abandoned task never leaves output.
    /// `adopted` is the partition a speculative copy fetched from its owner: it
    /// becomes this worker's here, with the output pending. Returns whether stored.
    pub fn set_pending(
        &self,
        key: (&str, u32),
        interval: IntervalId,
        output: (Arc<StatePartition>, ViewUpdate),
        adopted: Option<PartitionSlot>,
        cancel: &CancellationToken,
    ) -> bool {
        let mut partitions = lock(&self.0);
        if cancel.is_cancelled() {
            return false;
        }
        let (view, partition) = key;
        let slot = partitions.entry((view.to_string(), partition)).or_default();
        if let Some(adopted) = adopted {
            *slot = adopted;
        }
        slot.pending = Some((interval, output.0, output.1));
        true
    }

    /// Installs every pending output of `interval`; returns how many.
    pub fn commit(&self, interval: IntervalId) -> usize {
        let mut partitions = lock(&self.0);
        let mut committed: usize = 0;
        for slot in partitions.values_mut() {
            let Some((i, _, _)) = &slot.pending else {
                continue;
            };
            if *i != interval {
                continue;
            }
            let Some((_, state, update)) = slot.pending.take() else {
                continue;
            };
            slot.state = state;
            let rows: Option<ViewPartition> = match update {
                ViewUpdate::Replace(rows) => Some(Arc::new(rows)),
                ViewUpdate::Append(rows) if rows.is_empty() => None,
                ViewUpdate::Append(rows) => {
                    let mut all: Vec<RecordBatch> = slot.current_rows().as_ref().clone();
                    all.extend(rows);
                    Some(Arc::new(all))
                }
            };
            if let Some(rows) = rows {
                slot.versions.insert(interval, rows);
            }
            // Keep the newest version and those recent enough to be read.
            let oldest = interval.0.saturating_sub(VERSIONS_KEPT);
            while slot.versions.len() > 1 {
                match slot.versions.keys().next() {
                    Some(first) if first.0 < oldest => {
                        let first = *first;
                        slot.versions.remove(&first);
                        slot.expired = true;
                    }
                    _ => break,
                }
            }
            committed = committed.saturating_add(1);
        }
        committed
    }

    /// Drops the pending outputs of `interval`.
    pub fn discard(&self, interval: IntervalId) -> usize {
        let mut partitions = lock(&self.0);
        let mut dropped: usize = 0;
        for slot in partitions.values_mut() {
            if matches!(&slot.pending, Some((i, _, _)) if *i == interval) {
                slot.pending = None;
                dropped = dropped.saturating_add(1);
            }
        }
        dropped
    }

    /// A partition's rows as of `interval`: its view rows, unless that version is no
    /// longer kept or the partition is not here (it moved to another worker after
    /// the reader took its snapshot).
    pub fn view_rows(&self, view: &str, partition: u32, interval: IntervalId) -> ViewRowsRead {
        let partitions = lock(&self.0);
        match partitions.get(&(view.to_string(), partition)) {
            None => ViewRowsRead::NotHere,
            Some(slot) => match slot.rows_as_of(interval) {
                Some(rows) => ViewRowsRead::Rows(rows),
                None if slot.expired => ViewRowsRead::TooOld,
                None => ViewRowsRead::Rows(Arc::default()),
            },
        }
    }

    /// A partition's committed view rows.
    pub fn current_rows(&self, view: &str, partition: u32) -> ViewPartition {
        lock(&self.0)
            .get(&(view.to_string(), partition))
            .map(|slot| slot.current_rows())
            .unwrap_or_default()
    }

    /// Runs `f` on a partition's slot, if this worker holds the partition.
    pub fn with<R>(
        &self,
        view: &str,
        partition: u32,
        f: impl FnOnce(&PartitionSlot) -> R,
    ) -> Option<R> {
        lock(&self.0).get(&(view.to_string(), partition)).map(f)
    }

    /// Takes over a partition handed over by a leaving worker.
    pub fn adopt(&self, view: &str, partition: u32, slot: PartitionSlot) {
        lock(&self.0).insert((view.to_string(), partition), slot);
    }

    /// Forgets a partition another worker took over.
    pub fn remove(&self, view: &str, partition: u32) {
        lock(&self.0).remove(&(view.to_string(), partition));
    }

    pub fn count(&self) -> u64 {
        lock(&self.0).len() as u64
    }

    /// Every partition held here, as last committed.
    pub fn committed(&self) -> Vec<TakenPartition> {
        lock(&self.0)
            .iter()
            .map(|((view, partition), slot)| TakenPartition {
                view: view.clone(),
                partition: *partition,
                state: slot.state.clone(),
                rows: slot.current_rows(),
            })
            .collect()
    }

    /// Forgets the partitions in `drop` (they moved to another worker), pending
    /// output included.
    pub fn remove_all(&self, drop: &[(String, u32)]) {
        let mut partitions = lock(&self.0);
        for key in drop {
            partitions.remove(key);
        }
    }

    /// Forgets the partitions of stage `name` (dropped).
    pub fn forget(&self, name: &str) {
        lock(&self.0).retain(|(view, _), _| view != name);
    }

    /// Forgets every partition.
    pub fn clear(&self) {
        lock(&self.0).clear();
    }
}

/// One state partition of one view, on the worker that owns it.
#[derive(Debug, Default)]
pub struct PartitionSlot {
    pub state: Arc<StatePartition>,
    /// Committed view rows by interval, newest last; only intervals that changed them.
    pub versions: BTreeMap<IntervalId, ViewPartition>,
    /// Set once versions were dropped: reads before the kept ones cannot be served.
    pub expired: bool,
    /// The output of a reduce task, waiting for its interval's commit.
    pub pending: Option<(IntervalId, Arc<StatePartition>, ViewUpdate)>,
}

impl PartitionSlot {
    /// The view rows as of `interval`: the newest version at or before it.
    pub fn rows_as_of(&self, interval: IntervalId) -> Option<ViewPartition> {
        self.versions
            .range(..=interval)
            .next_back()
            .map(|(_, rows)| rows.clone())
    }

    pub fn current_rows(&self) -> ViewPartition {
        self.versions
            .values()
            .next_back()
            .cloned()
            .unwrap_or_default()
    }
}

/// A partition read for an ad-hoc query.
#[derive(Debug)]
pub enum ViewRowsRead {
    Rows(ViewPartition),
    /// The interval asked for is older than the versions this worker keeps.
    TooOld,
    /// This worker does not hold the partition (any more).
    NotHere,
}
