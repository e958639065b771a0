//! A live view stage: [`ViewSlot`], its plan, placement and recent changes.

use std::collections::VecDeque;
use std::sync::Arc;

use dstream_planner::StreamPlan;
use dstream_storage::IntervalId;

use super::input::SealedInterval;
use super::placement::Placement;

/// A view: its plan, where its state partitions live and, if it stopped, why.
#[derive(Debug)]
pub struct ViewSlot {
    pub plan: Arc<StreamPlan>,
    /// The worker of each state partition, once placed.
    pub placement: Placement,
    pub failure: Option<String>,
    /// The first interval the view ran: recovery without a checkpoint replays from
    /// there.
    pub first_interval: Option<IntervalId>,
    pub last_interval: Option<IntervalId>,
    /// Rows of each partition after the last interval.
    pub partition_rows: Vec<u64>,
    /// The first interval the view runs (the one after its creation); `None` when
    /// unknown (restored without a checkpoint: from the start).
    pub since: Option<IntervalId>,
    /// For a stage other stages read: where the changes of each recent interval are
    /// kept, one block per partition that changed (as a source's input is kept), so
    /// that a recovery can replay them into the readers' lost partitions.
    pub changes: VecDeque<SealedInterval>,
    /// What the stage did in its last interval.
    pub stats: StageStats,
}

/// What one stage did in one interval, for the status the HTTP API reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StageStats {
    /// Rows of the blocks its map tasks read.
    pub rows_in: u64,
    /// Rows of its changelog (deleted and inserted).
    pub rows_out: u64,
    /// Rows it holds after the interval.
    pub state_rows: u64,
    /// Estimated memory of its state partitions (view rows and state tables).
    pub state_bytes: u64,
    /// Time its tasks ran, summed over the tasks.
    pub task_micros: u64,
}

impl StageStats {
    /// The sum of `self` and `other`, field by field.
    pub fn plus(self, other: StageStats) -> StageStats {
        StageStats {
            rows_in: self.rows_in.saturating_add(other.rows_in),
            rows_out: self.rows_out.saturating_add(other.rows_out),
            state_rows: self.state_rows.saturating_add(other.state_rows),
            state_bytes: self.state_bytes.saturating_add(other.state_bytes),
            task_micros: self.task_micros.saturating_add(other.task_micros),
        }
    }
}

impl ViewSlot {
    pub fn new(plan: Arc<StreamPlan>) -> Self {
        ViewSlot {
            changes: VecDeque::new(),
            since: None,
            plan,
            placement: Placement::default(),
            failure: None,
            first_interval: None,
            last_interval: None,
            partition_rows: Vec::new(),
            stats: StageStats::default(),
        }
    }

    /// Whether the view's tasks run in `interval`: it has not failed, its partitions
    /// are placed, and `interval` is not before its first.
    pub fn runs_in(&self, interval: IntervalId) -> bool {
        self.failure.is_none()
            && self.placement.is_placed()
            && self.since.is_none_or(|s| s <= interval)
    }

    /// Records where the changes of an interval are kept (again, if an earlier
    /// attempt of it did), and forgets intervals workers no longer keep: those
    /// before the last `retain_intervals` and before `lineage` (see
    /// `WorkerState::expire_blocks`).
    pub fn record_changes(
        &mut self,
        changes: SealedInterval,
        lineage: Option<IntervalId>,
        retain_intervals: u64,
    ) {
        let interval = changes.interval;
        self.changes.retain(|c| c.interval != interval);
        self.changes.push_back(changes);
        let mut keep_from = interval
            .0
            .saturating_sub(retain_intervals.saturating_sub(1));
        if let Some(lineage) = lineage {
            keep_from = keep_from.min(lineage.0);
        }
        self.changes.retain(|c| c.interval.0 >= keep_from);
    }

    /// Where the changes of `interval` are kept, if they still are.
    pub fn changes_of(&self, interval: IntervalId) -> Option<&SealedInterval> {
        self.changes.iter().find(|c| c.interval == interval)
    }

    /// Whether this is a stage before a view's last: internal, not shown to users.
    pub fn is_inner_stage(&self) -> bool {
        self.plan.name != self.plan.view
    }
}
