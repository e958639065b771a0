//! What the coordinator changes: [`EngineState`], the catalog, the live sources,
//! tables and view stages, and the timeline. The interval loop ([`crate::engine`])
//! and the coordinator phases ([`crate::cluster`]) are functions over it.
//!
//! # Layout
//! - [`source`]: [`SourceSlot`], a source's receivers and what they sealed.
//! - [`view`]: [`ViewSlot`], a view stage's plan, placement and kept changes.
//! - [`placement`]: [`Placement`], the one answer to where partitions and receivers
//!   run, and [`Load`], which worker takes the next one.
//! - [`sealing`]: [`Sealing`], an interval's seals across attempts.
//! - [`inbox`]: [`Inbox`], records pushed to an `http` source, until sealed.
//! - [`input`]: [`SealedInterval`] and [`BlockInfo`], input blocks and their holders.
//! - [`table`]: [`TableSlot`], a user table.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use dstream_planner::Catalog;
use dstream_storage::{IntervalId, Timeline};

use crate::cluster::scheduler;

pub mod inbox;
pub mod input;
pub mod placement;
pub mod sealing;
pub mod source;
pub mod table;
pub mod view;

pub use inbox::Inbox;
pub use input::{BlockInfo, SealedInterval};
pub use placement::{Load, Placement};
pub use sealing::Sealing;
pub use source::{SourceSlot, SplitPosition};
pub use table::{TableSlot, memory_rows};
pub use view::ViewSlot;

/// What the coordinator changes: the catalog, the runtimes and the timeline.
#[derive(Debug)]
pub struct EngineState {
    pub catalog: Catalog,
    pub settings: BTreeMap<String, String>,
    pub timeline: Timeline,
    pub next: IntervalId,
    pub sources: BTreeMap<String, SourceSlot>,
    pub tables: BTreeMap<String, TableSlot>,
    pub views: BTreeMap<String, ViewSlot>,
    pub last_committed: Option<IntervalId>,
    /// Bumped by every change of the catalog; workers get it installed.
    pub catalog_version: u64,
    /// Stored definitions that could not be restored at startup, and why.
    pub unrestored: Vec<(dstream_storage::CatalogEntry, String)>,
    /// The interval in progress as far as it was sealed: an attempt of it after a
    /// lost worker seals only the receivers that had not.
    pub sealing: Option<Sealing>,
    /// The interval after the one in progress, as far as its receivers sealed it
    /// while that one ran (both were due: the engine is catching up). Its seals
    /// are not done again, and until it runs, a receiver that moves carries on
    /// from after them.
    pub sealed_ahead: Option<Sealing>,
    /// The map stage of that interval, started once it was sealed ahead.
    pub mapped_ahead: Option<scheduler::MappedAhead>,
    /// The first id of the next range of task ids a stage run apart from its
    /// interval's own takes: a map stage started ahead, or a recovery's replay (see
    /// [`scheduler::reserve_task_ids`]).
    pub next_task_range: u64,
    /// The cluster membership (see `Cluster::membership_version`) that state
    /// partitions were last evened out for: they are evened out again only when a
    /// worker joins, leaves or dies, so partitions that speculative copies moved off
    /// a straggler stay off it.
    pub balanced_for: Option<u64>,
    /// Workers a speculative copy outran, and the last interval it did: their blocks'
    /// map tasks go to the blocks' other holders for a while (see `scheduler`).
    pub outrun: BTreeMap<u64, IntervalId>,
    /// The checkpoint to resume from once a worker joins (a coordinator that started
    /// without workers).
    pub resume: Option<Arc<dstream_storage::checkpoint::Manifest>>,
}

impl EngineState {
    /// The level of every stage: 0 for a stage that reads a source, one more than
    /// the stage it reads otherwise. A level runs after the levels below it.
    pub fn stage_levels(&self) -> HashMap<String, usize> {
        fn level(
            state: &EngineState,
            name: &str,
            levels: &mut HashMap<String, usize>,
            depth: usize,
        ) -> usize {
            if let Some(l) = levels.get(name) {
                return *l;
            }
            // Stages read earlier ones, so this ends at sources (and cannot loop,
            // but is cut at the number of stages in case).
            let Some(slot) = state.views.get(name).filter(|_| depth <= state.views.len()) else {
                return 0;
            };
            let l = slot
                .plan
                .inputs
                .iter()
                .filter(|input| state.views.contains_key(input.as_str()))
                .map(|input| level(state, input, levels, depth.saturating_add(1)).saturating_add(1))
                .max()
                .unwrap_or(0);
            levels.insert(name.to_string(), l);
            l
        }
        let mut levels: HashMap<String, usize> = HashMap::new();
        for name in self.views.keys() {
            level(self, name, &mut levels, 0);
        }
        levels
    }

    /// The input `input` (a source, or a stage other stages read) in `interval`, if
    /// still held: the source's blocks, or where the stage's changes are.
    pub fn input_of(&self, input: &str, interval: IntervalId) -> Option<&SealedInterval> {
        match self.views.get(input) {
            Some(upstream) => upstream.changes_of(interval),
            None => self.sources.get(input)?.input_of(interval),
        }
    }

    /// How many intervals of input workers keep whatever the lineage (as
    /// `source_retention` says).
    pub fn retain_intervals(&self, retention: Duration) -> u64 {
        let retention = retention.as_nanos();
        retention
            .checked_div(self.timeline.width().as_nanos())
            .unwrap_or(retention)
            .max(1) as u64
    }

    /// Whether stage `name` is read by other stages.
    pub fn is_read(&self, name: &str) -> bool {
        self.views
            .values()
            .any(|v| v.plan.inputs.iter().any(|i| i == name))
    }

    /// The stages of view `view`, its own last.
    pub fn stages_of(&self, view: &str) -> Vec<String> {
        let mut stages: Vec<String> = self
            .views
            .iter()
            .filter(|(_, slot)| slot.plan.view == view)
            .map(|(name, _)| name.clone())
            .collect();
        stages.sort_by_key(|name| name == view);
        stages
    }

    /// Forgets view `view` and all its stages.
    pub fn remove_view(&mut self, view: &str) {
        self.views.retain(|_, slot| slot.plan.view != view);
    }

    /// The statement that defined the view stage `stage` belongs to.
    pub fn stage_sql(&self, stage: &str) -> Option<String> {
        let view = &self.views.get(stage)?.plan.view;
        Some(self.catalog.get(view)?.sql().to_string())
    }

    /// The stages that cannot run once `failed` did: the other stages of its view,
    /// and every stage that reads one of them, transitively.
    pub fn failing_with(&self, failed: &str) -> BTreeSet<String> {
        let mut out: BTreeSet<String> = BTreeSet::new();
        let mut views: Vec<String> = self
            .views
            .get(failed)
            .map(|s| vec![s.plan.view.clone()])
            .unwrap_or_default();
        while let Some(view) = views.pop() {
            for (name, slot) in &self.views {
                if slot.plan.view == view && out.insert(name.clone()) {
                    // Views that read this one.
                    for other in self.views.values() {
                        if other.plan.inputs.contains(name) && other.plan.view != view {
                            views.push(other.plan.view.clone());
                        }
                    }
                }
            }
        }
        out.remove(failed);
        out
    }

    /// What the receivers sealed of `interval` so far: in an earlier attempt of it,
    /// or ahead while the interval before it ran.
    pub fn take_sealing(&mut self, interval: IntervalId) -> Option<Sealing> {
        [&mut self.sealing, &mut self.sealed_ahead]
            .into_iter()
            .find(|s| s.as_ref().is_some_and(|s| s.interval == interval))
            .and_then(Option::take)
    }

    /// Forgets what a dropped source's receivers sealed ahead: a source created again
    /// under its name seals from scratch.
    pub fn forget_seals(&mut self, source: &str) {
        if let Some(ahead) = &mut self.sealed_ahead {
            ahead.forget(source);
        }
    }
}
