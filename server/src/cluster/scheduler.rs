//! One interval across the workers.
//!
//! [`run_interval`] is the coordinator's side of the per-interval stage DAG:
//! 1. **seal**: every worker with receivers seals the interval; each block is stored
//!    on that worker and on the next live worker (its replica) before the answer. A
//!    source may have several receivers (splits) on several workers; its blocks are
//!    theirs in split order, and its watermark the highest they reached;
//! 2. **map**: one task per (view, block), placed on a live holder of the block — the
//!    less loaded of the two — so map work is local and spread;
//! 3. **reduce**: one task per (view, partition) on the worker that owns the state
//!    partition; it reads its shuffle pieces locally or over Flight;
//! 4. **commit**: every worker installs the interval's outputs, and only then does the
//!    coordinator publish the interval.
//!
//! All tasks of a stage on one worker go in one `RunTasks` call, so an interval costs
//! a handful of round trips whatever the number of views; a task that straggles gets
//! a speculative copy on another worker (see [`super::stage`]), and a reduce task
//! whose copy wins moves its state partition there. Intervals run one after the
//! other: interval *t+1*'s reduce tasks start only once *t* is committed, so results
//! that depend on order (state, watermarks, window closes) never see *t+1* before
//! *t*. When *t+1* is due already (the engine is behind), its receivers seal it while
//! *t* maps, reduces and commits, and its map tasks, which depend on their block
//! alone, start as soon as it is sealed ([`MappedAhead`]); workers give *t*'s tasks
//! their slots first. Both fill the cores the stage barriers leave idle. Each
//! interval still holds what had arrived when it was sealed, and its tasks see the
//! state and watermarks they would have seen.
//!
//! A worker lost before every reduce task answered *interrupts* the interval
//! ([`Interrupted`]): nothing of it is published, the engine drops its uncommitted
//! work, recovers what the worker held (`recovery`) and runs the interval again. The
//! receivers that sealed it already (in an attempt, or ahead) are not sealed again
//! (`EngineState::sealing`, `EngineState::sealed_ahead`), so the second attempt sees
//! the same input. A worker lost during the commit does
//! not interrupt it: every result is in, and recovery replays the interval into the
//! partitions that worker held.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dstream_executor::Changelog;
use dstream_executor::rpc::codec::timeline_message;
use dstream_executor::rpc::proto::{self, task::Kind as TaskKind};
use dstream_executor::rpc::{ipc_bytes, read_ipc};
use dstream_executor::shuffle::piece_id;
use dstream_executor::view_runtime::window_watermark;
use dstream_planner::StreamPlan;
use dstream_storage::IntervalId;
use futures::future::join_all;
use futures::stream::{FuturesUnordered, StreamExt};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::{info, warn};

use super::stage::{
    ReduceMode, ReduceOf, Speculation, StageOutcome, StageTask, run_fed_stage, run_stage,
};
use super::{Cluster, PROBE_WAIT, WorkerRecord};
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::state::view::StageStats;
use crate::state::{BlockInfo, EngineState, Load, Placement, SealedInterval, Sealing, SourceSlot};

/// What one interval did, for `dstream_intervals`.
#[derive(Debug, Default)]
pub struct StageCounts {
    pub map_tasks: u64,
    /// Of `map_tasks`, those started ahead, while the interval before ran.
    pub map_tasks_ahead: u64,
    pub reduce_tasks: u64,
    pub shuffle_bytes: u64,
    pub workers: u64,
    /// Speculative copies of straggling tasks started.
    pub speculative_tasks: u64,
}

/// The outcome of one view in one interval.
#[derive(Debug)]
pub enum ViewOutcome {
    Done {
        changelog: Changelog,
        partition_rows: Vec<u64>,
        stats: StageStats,
    },
    Failed(String),
}

/// Where a map task left its output.
#[derive(Debug)]
pub(crate) struct MapOutput {
    pub block: u32,
    pub worker: u64,
    /// Rows for each partition; partitions with none are not read.
    pub partition_rows: Vec<u64>,
    pub components: u32,
}

/// The map outputs partition `p`'s reduce task reads (those with rows for it), in
/// block order as `outputs` are.
pub(crate) fn pieces_for(
    cluster: &Cluster,
    outputs: &[MapOutput],
    p: usize,
) -> Vec<proto::PieceLocation> {
    outputs
        .iter()
        .filter(|o| o.partition_rows.get(p).copied().unwrap_or(0) > 0)
        .map(|o| proto::PieceLocation {
            block: o.block,
            worker: o.worker,
            address: cluster.get(o.worker).map(|w| w.address).unwrap_or_default(),
            components: o.components,
            interval: None,
        })
        .collect()
}

/// Where each successful map task (by id: what it mapped — a view, say — and its
/// block, `of_task`) left its output, by what it mapped.
pub(crate) fn map_outputs<K: Clone + Eq + std::hash::Hash>(
    results: HashMap<u64, (u64, proto::TaskResult)>,
    of_task: &HashMap<u64, (K, u32)>,
) -> HashMap<K, Vec<MapOutput>> {
    let mut outputs: HashMap<K, Vec<MapOutput>> = HashMap::new();
    for (id, (worker, r)) in results {
        if let Some((view, block)) = of_task.get(&id) {
            outputs.entry(view.clone()).or_default().push(MapOutput {
                block: *block,
                worker,
                partition_rows: r.partition_rows,
                components: r.components,
            });
        }
    }
    outputs
}

/// The next live worker after `id` in id order: where `id`'s blocks are replicated.
fn replica_of(alive: &[WorkerRecord], id: u64) -> Option<&WorkerRecord> {
    let others: Vec<&WorkerRecord> = alive.iter().filter(|w| w.id != id).collect();
    others
        .iter()
        .find(|w| w.id > id)
        .or_else(|| others.first())
        .copied()
}

/// Places one map task per block on a live holder of the block: the first one (the
/// receiver's worker, where the block is decoded already) unless that leaves the
/// load uneven, in which case tasks move to replicas until no worker has more than
/// one task above another that could take one. `load` counts tasks per worker across
/// calls. Fails with the index of a block no live worker holds.
pub(crate) fn place_map_tasks(
    blocks: &[BlockInfo],
    alive: impl Fn(u64) -> bool,
    load: &mut HashMap<u64, usize>,
) -> std::result::Result<Vec<u64>, u32> {
    let mut placed = Vec::with_capacity(blocks.len());
    for block in blocks {
        let holder = *block
            .holders
            .iter()
            .find(|h| alive(**h))
            .ok_or(block.index)?;
        let n = load.entry(holder).or_default();
        *n = n.saturating_add(1);
        placed.push(holder);
    }
    // Every move lowers the sum of squared loads, so this ends.
    loop {
        let mut moved = false;
        for (block, holder) in blocks.iter().zip(placed.iter_mut()) {
            let current = load.get(holder).copied().unwrap_or(0);
            let lighter = block
                .holders
                .iter()
                .filter(|h| alive(**h) && **h != *holder)
                .map(|h| (load.get(h).copied().unwrap_or(0), *h))
                .min();
            if let Some((other_load, other)) = lighter
                && other_load.saturating_add(1) < current
            {
                let n = load.entry(*holder).or_default();
                *n = n.saturating_sub(1);
                let n = load.entry(other).or_default();
                *n = n.saturating_add(1);
                *holder = other;
                moved = true;
            }
        }
        if !moved {
            return Ok(placed);
        }
    }
}

/// Intervals after being outrun by a speculative copy during which a worker gets map
/// tasks only for blocks no other live worker holds. Then it is trusted again (and
/// if it still straggles, its copies are outrun again).
pub const AVOID_STRAGGLER_FOR: u64 = 10;

/// Remembers the workers copies outran in `interval`.
fn note_outrun(
    state: &mut EngineState,
    outrun: &std::collections::BTreeSet<u64>,
    interval: IntervalId,
) {
    for worker in outrun {
        let before = state.outrun.insert(*worker, interval);
        if before.is_none_or(|at| at.0.saturating_add(AVOID_STRAGGLER_FOR) <= interval.0) {
            info!(worker, %interval, "a worker straggles; its blocks' map tasks go to their other holders for a while");
        }
    }
}

/// What the commit of an interval tells the workers about checkpoints.
#[derive(Clone, Copy, Debug, Default)]
pub struct CommitOptions {
    /// Take a checkpoint of the state this commit leaves.
    pub checkpoint: bool,
    /// The first interval recovery may replay: input from there on is kept whatever
    /// the retention. `None` when checkpoints are off (nothing is replayed).
    pub lineage: Option<IntervalId>,
}

/// An interval that could not complete because a worker it needed was lost; says
/// which, and which views had tasks on a lost worker when it was lost (a view
/// whose tasks are there every time a worker dies may be what kills them).
#[derive(Debug)]
pub struct Interrupted {
    pub reason: String,
    pub suspects: BTreeSet<String>,
}

impl Interrupted {
    /// An interruption no task is suspected of.
    pub fn by(reason: String) -> Interrupted {
        Interrupted {
            reason,
            suspects: BTreeSet::new(),
        }
    }
}

/// The views of a stage's tasks that got no result while their worker — no longer
/// alive — was running them (not only holding them in its queue).
fn suspects(
    cluster: &Cluster,
    stage: &StageOutcome,
    views_of: &HashMap<u64, (String, u32)>,
) -> BTreeSet<String> {
    stage
        .lost
        .iter()
        .filter(|(id, (worker, _))| stage.lost_running.contains(id) && !cluster.is_alive(*worker))
        .filter_map(|(id, _)| views_of.get(id).map(|(view, _)| view.clone()))
        .collect()
}

/// The first worker of `alive` that is no longer alive, described. With `probe`,
/// every worker is asked first (a task failed: perhaps reading from a worker that
/// died), so that a dead one is noticed before its heartbeats stop.
async fn lost_worker(cluster: &Cluster, alive: &[WorkerRecord], probe: bool) -> Option<String> {
    if probe {
        let _ = tokio::time::timeout(
            PROBE_WAIT,
            cluster.call_each(alive, "report status", |client| async move {
                client.status(proto::StatusRequest {}).await
            }),
        )
        .await;
    }
    alive
        .iter()
        .find(|w| !cluster.is_alive(w.id))
        .map(|w| cluster.unavailable(w.id))
}

/// What one interval gives: each view's outcome and counts, or why it was interrupted.
type IntervalResult =
    std::result::Result<(BTreeMap<String, ViewOutcome>, StageCounts), Interrupted>;

/// Seals, maps, reduces and commits `interval`. Updates sources (stats, retained
/// blocks, failures) in `state`; returns each view's outcome.
///
/// With `seal_next` (the next interval is due as well: the engine is behind), the
/// receivers seal the next interval while this one maps, reduces and commits, and
/// its map tasks start as soon as it is sealed ([`MappedAhead`]), so that their work
/// fills the cores the stage barriers leave idle. The next interval's watermarks are
/// the ones this seal left (`EngineState::sealed_ahead`), and its reduce tasks run
/// when it does.
pub async fn run_interval(
    engine: &Engine,
    state: &mut EngineState,
    interval: IntervalId,
    commit: CommitOptions,
    seal_next: bool,
) -> IntervalResult {
    let cluster = engine.inner.cluster.clone();
    let alive = cluster.alive();
    let timeline = timeline_message(&state.timeline);
    let started = Instant::now();
    let blocks = seal(&cluster, state, interval, commit, &alive, timeline).await?;
    let ahead = seal_next.then(|| {
        let next = interval.next();
        let sealing = state
            .take_sealing(next)
            .unwrap_or_else(|| Sealing::new(next, &state.sources));
        let requests = seal_requests(state, &sealing, &alive, timeline);
        (sealing, requests, AheadPlan::new(state, &cluster, next))
    });
    let speculation = engine.inner.config.speculation;
    let seal_ahead = async {
        let (mut sealing, requests, plan) = ahead?;
        // Each worker's blocks are mapped as soon as it has sealed them, not once
        // every worker has: the stage started ahead takes tasks as answers come.
        let mut mapping = plan.start(&cluster, &sealing, &requests, speculation);
        let mut answers: FuturesUnordered<_> = requests
            .into_iter()
            .map(|(id, request)| send_seal(&cluster, id, request))
            .collect();
        let mut lost = None;
        while let Some((worker, answer)) = answers.next().await {
            let sealed = answer.as_ref().map_or(&[][..], |r| r.sources.as_slice());
            mapping.sealed(&cluster, worker, sealed);
            let lost_here = record_seals(&cluster, &mut sealing, vec![(worker, answer)]);
            lost = lost.or(lost_here);
        }
        // A worker lost before it answered: its receivers seal the next interval
        // wherever recovery reopens them (after the seals they did answer), and
        // nothing of it is mapped ahead.
        let mapped = match lost {
            None => mapping.finish(),
            Some(_) => None,
        };
        Some((sealing, mapped))
    };
    let (outcome, ahead) = futures::join!(
        run_stages(engine, state, interval, commit, &alive, blocks, started),
        seal_ahead
    );
    if let Some((sealing, mapped)) = ahead {
        state.sealed_ahead = Some(sealing);
        // An interrupted interval runs again after recovery, which may move blocks:
        // the next one's maps start again then.
        if outcome.is_ok() {
            state.mapped_ahead = mapped;
        }
    }
    outcome
}

/// What starting the next interval's map stage ahead needs of the engine state, taken
/// before the interval in progress runs (which changes it).
struct AheadPlan {
    interval: IntervalId,
    membership: u64,
    /// The views that take part in it, and their plans.
    views: Vec<(String, Arc<StreamPlan>)>,
    outrun: BTreeMap<u64, IntervalId>,
    first_task: u64,
}

impl AheadPlan {
    fn new(state: &mut EngineState, cluster: &Cluster, interval: IntervalId) -> Self {
        let first_task = reserve_task_ids(state);
        AheadPlan {
            interval,
            membership: cluster.membership_version(),
            views: state
                .views
                .iter()
                .filter(|(_, v)| v.runs_in(interval))
                .map(|(n, v)| (n.clone(), v.plan.clone()))
                .collect(),
            outrun: state.outrun.clone(),
            first_task,
        }
    }

    /// Starts the map stage with the tasks of the splits `sealing` holds already (an
    /// earlier attempt sealed them); [`AheadMapping::sealed`] gives it those of each
    /// worker's seal (`requests`) as it answers.
    fn start(
        self,
        cluster: &Arc<Cluster>,
        sealing: &Sealing,
        requests: &[(u64, proto::SealRequest)],
        speculation: Option<Speculation>,
    ) -> AheadMapping {
        let mut pending: HashMap<u64, HashMap<String, usize>> = HashMap::new();
        for (worker, request) in requests {
            for split in &request.splits {
                let n = pending
                    .entry(*worker)
                    .or_default()
                    .entry(split.source.clone())
                    .or_default();
                *n = n.saturating_add(1);
            }
        }
        let (tasks, more) = mpsc::unbounded_channel();
        let stage_cluster = cluster.clone();
        // Copies of stragglers take ids from the upper half of the stage's range.
        let mut next_copy = self.first_task.saturating_add(RANGED_TASK_IDS / 2);
        let mut stage = JoinSet::new();
        stage.spawn(async move {
            let what = "run map tasks ahead";
            run_fed_stage(
                &stage_cluster,
                vec![],
                more,
                what,
                speculation,
                &mut next_copy,
            )
            .await
        });
        let mut mapping = AheadMapping {
            next_task: self.first_task,
            plan: self,
            pending,
            load: HashMap::new(),
            views: HashMap::new(),
            of_task: HashMap::new(),
            tasks,
            stage,
        };
        let before: Vec<proto::SealedSource> = sealing.splits.values().cloned().collect();
        mapping.map(cluster, &before);
        mapping
    }
}

/// The map stage of the next interval while its receivers seal it ahead.
struct AheadMapping {
    plan: AheadPlan,
    /// The splits of each source that workers still have to seal, by worker.
    pending: HashMap<u64, HashMap<String, usize>>,
    next_task: u64,
    /// Map tasks placed per worker, across views.
    load: HashMap<u64, usize>,
    views: HashMap<String, Arc<StreamPlan>>,
    of_task: HashMap<u64, (String, u32)>,
    tasks: mpsc::UnboundedSender<Vec<StageTask>>,
    stage: JoinSet<StageOutcome>,
}

impl AheadMapping {
    /// Starts the map tasks of the blocks `worker` answered it sealed (`splits`;
    /// none if its seal failed).
    fn sealed(&mut self, cluster: &Cluster, worker: u64, splits: &[proto::SealedSource]) {
        self.pending.remove(&worker);
        self.map(cluster, splits);
    }

    /// Starts the map tasks of the blocks of `splits`, for every view over their
    /// sources, except of splits that failed. Each worker that has not answered yet
    /// counts, for placement, as many tasks as its splits will likely have blocks (as
    /// many per split as these have), so that the first answer's blocks do not all
    /// move to their replicas to even the load.
    fn map(&mut self, cluster: &Cluster, splits: &[proto::SealedSource]) {
        let interval = self.plan.interval;
        let mut batch = Vec::new();
        for (name, plan) in &self.plan.views {
            if plan.inputs.len() > 1 {
                // A union's map tasks start with its interval.
                continue;
            }
            let splits: Vec<&proto::SealedSource> =
                splits.iter().filter(|s| s.source == plan.source).collect();
            if splits.is_empty() || splits.iter().any(|s| !s.failure.is_empty()) {
                continue;
            }
            let blocks = blocks_of(interval, splits.iter().copied());
            let per_split = blocks.len().div_ceil(splits.len());
            let expected: Vec<(u64, usize)> = self
                .pending
                .iter()
                .filter_map(|(w, sources)| {
                    Some((*w, sources.get(&plan.source)?.saturating_mul(per_split)))
                })
                .collect();
            for (w, n) in &expected {
                let load = self.load.entry(*w).or_default();
                *load = load.saturating_add(*n);
            }
            let placed = map_tasks(
                (name, (0, &plan.source)),
                interval,
                &blocks,
                &[],
                (cluster, &self.plan.outrun),
                (&mut self.load, &mut self.next_task),
            );
            for (w, n) in &expected {
                if let Some(load) = self.load.get_mut(w) {
                    *load = load.saturating_sub(*n);
                }
            }
            let Ok(placed) = placed else {
                continue;
            };
            for (task, block) in placed {
                self.of_task.insert(task.task.id, (name.clone(), block));
                batch.push(task);
            }
            self.views.insert(name.clone(), plan.clone());
        }
        if !batch.is_empty() {
            // The stage ends only once this sender is gone: it is running.
            let _ = self.tasks.send(batch);
        }
    }

    /// The stage, once every worker answered. `None` when it has no tasks.
    fn finish(self) -> Option<MappedAhead> {
        if self.of_task.is_empty() {
            return None;
        }
        Some(MappedAhead {
            interval: self.plan.interval,
            membership: self.plan.membership,
            views: self.views,
            of_task: self.of_task,
            stage: self.stage,
        })
    }
}

/// Task ids each stage run apart from its interval's own has to itself; the ranges
/// start at [`FIRST_RANGED_TASK`], far above the ids of the stages an interval runs
/// itself, and are never used twice, so that no two tasks of one interval share an
/// id (and the token that abandons a task) on a worker: not a map task started
/// ahead and one started in its interval, nor the replays of one interval by two
/// recoveries (the first cut short by another lost worker).
const RANGED_TASK_IDS: u64 = 1 << 20;
pub const FIRST_RANGED_TASK: u64 = 1 << 40;

/// Takes the next range of [`RANGED_TASK_IDS`] task ids; returns its first.
pub(crate) fn reserve_task_ids(state: &mut EngineState) -> u64 {
    let first = state.next_task_range;
    state.next_task_range = state.next_task_range.saturating_add(RANGED_TASK_IDS);
    first
}

/// The map stage of the interval after the one in progress, whose tasks started as
/// soon as the receivers sealed their blocks ahead. A map task depends on its block alone, so it may run
/// before the interval in progress commits; workers give that interval's tasks their
/// slots first. The next interval uses the outputs of the views whose plan and
/// blocks are still those, while the workers are the same. Dropped, it stops.
#[derive(Debug)]
pub struct MappedAhead {
    interval: IntervalId,
    /// `Cluster::membership_version` when it was placed.
    membership: u64,
    views: HashMap<String, Arc<StreamPlan>>,
    of_task: HashMap<u64, (String, u32)>,
    /// The stage's one task: dropped, it stops.
    stage: JoinSet<StageOutcome>,
}

impl MappedAhead {
    /// Waits for the stage, if it mapped `interval` for the workers there are now.
    async fn outcome(mut self, cluster: &Cluster, interval: IntervalId) -> Option<MappedOutputs> {
        if self.interval != interval || self.membership != cluster.membership_version() {
            return None;
        }
        let mut stage = self.stage.join_next().await?.ok()?;
        let results = std::mem::take(&mut stage.results);
        Some(MappedOutputs {
            views: self.views,
            outputs: map_outputs(results, &self.of_task),
            stage,
        })
    }
}

/// What a map stage started ahead left.
struct MappedOutputs {
    views: HashMap<String, Arc<StreamPlan>>,
    outputs: HashMap<String, Vec<MapOutput>>,
    /// Its copies and stragglers (its results are in `outputs`).
    stage: StageOutcome,
}

impl MappedOutputs {
    /// View `name`'s outputs, if they were mapped with `plan` from `blocks` (all of
    /// them) and are on live workers.
    fn take(
        &mut self,
        cluster: &Cluster,
        (name, plan): (&str, &Arc<StreamPlan>),
        blocks: &[BlockInfo],
    ) -> Option<Vec<MapOutput>> {
        if !self.views.get(name).is_some_and(|p| Arc::ptr_eq(p, plan)) {
            return None;
        }
        let outputs = self.outputs.remove(name)?;
        let mut mapped: Vec<u32> = outputs.iter().map(|o| o.block).collect();
        mapped.sort_unstable();
        let usable = mapped.iter().copied().eq(blocks.iter().map(|b| b.index))
            && outputs.iter().all(|o| cluster.is_alive(o.worker));
        usable.then_some(outputs)
    }
}

/// The map tasks of a stage (`name`) in `interval` over one of its inputs (its
/// index among the stage's inputs, and name): one per block of `blocks`, each with
/// the piece id its output is kept under ([`piece_id`]), placed by
/// [`place_map_tasks`] on live workers no speculative copy outran lately (`outrun`)
/// if the blocks allow, else on any live one. They produce the rows of `partitions`
/// only (a recovery's replay), of all when it is empty. `load` counts tasks per
/// worker across views; task ids come from `next_task`. Fails when a block is on
/// no live worker.
pub(crate) fn map_tasks(
    (name, (input, source)): (&str, (u32, &str)),
    interval: IntervalId,
    blocks: &[BlockInfo],
    partitions: &[u32],
    (cluster, outrun): (&Cluster, &BTreeMap<u64, IntervalId>),
    (load, next_task): (&mut HashMap<u64, usize>, &mut u64),
) -> std::result::Result<Vec<(StageTask, u32)>, String> {
    let alive = |w: u64| cluster.is_alive(w);
    let trusted = |w: u64| {
        alive(w)
            && outrun
                .get(&w)
                .is_none_or(|at| at.0.saturating_add(AVOID_STRAGGLER_FOR) <= interval.0)
    };
    let mut tried = load.clone();
    let placed = match place_map_tasks(blocks, trusted, &mut tried) {
        Ok(placed) => {
            *load = tried;
            placed
        }
        Err(_) => place_map_tasks(blocks, alive, load)
            .map_err(|index| format!("block {index} of \"{source}\" is on no live worker"))?,
    };
    blocks
        .iter()
        .zip(placed)
        .map(|(block, holder)| {
            *next_task = next_task.saturating_add(1);
            let piece = piece_id(input, block.index).map_err(|e| e.to_string())?;
            let task = StageTask {
                worker: holder,
                task: proto::Task {
                    id: *next_task,
                    view: name.to_string(),
                    interval: interval.0,
                    kind: Some(TaskKind::Map(proto::MapTask {
                        source: source.to_string(),
                        block: block.index,
                        partitions: partitions.to_vec(),
                        input,
                    })),
                },
                // A copy may run on any other holder of the block.
                alternatives: block.holders.clone(),
            };
            Ok((task, piece))
        })
        .collect()
}

/// A source's blocks in `interval`, in index order, from what its receivers sealed.
fn blocks_of<'a>(
    interval: IntervalId,
    splits: impl IntoIterator<Item = &'a proto::SealedSource>,
) -> Vec<BlockInfo> {
    let mut blocks: Vec<BlockInfo> = splits
        .into_iter()
        .flat_map(|s| s.blocks.iter())
        .map(|b| BlockInfo {
            interval,
            index: b.index,
            rows: b.rows,
            bytes: b.bytes,
            holders: b.holders.clone(),
        })
        .collect();
    blocks.sort_by_key(|b| b.index);
    blocks
}

/// The seal requests, by worker, of the receivers that have not sealed
/// `sealing.interval` yet.
fn seal_requests(
    state: &EngineState,
    sealing: &Sealing,
    alive: &[WorkerRecord],
    timeline: proto::Timeline,
) -> Vec<(u64, proto::SealRequest)> {
    // Sources take part from the interval after their creation.
    let mut to_seal: BTreeMap<u64, Vec<proto::ReceiverSplit>> = BTreeMap::new();
    for (name, slot) in state.sources.iter().filter(|(_, s)| {
        s.failure.is_none() && s.since.is_none_or(|since| since <= sealing.interval)
    }) {
        let splits = slot.receivers.len() as u32;
        for (split, worker) in slot.receivers.iter() {
            if !sealing.splits.contains_key(&(name.clone(), split)) {
                to_seal
                    .entry(worker)
                    .or_default()
                    .push(proto::ReceiverSplit {
                        source: name.clone(),
                        split,
                        splits,
                    });
            }
        }
    }
    to_seal
        .into_iter()
        .map(|(id, splits)| {
            let replica = replica_of(alive, id);
            // The records pushed that one request carries, over all its sources.
            let mut budget = SEAL_PUSHED_BYTES;
            let pushed = splits
                .iter()
                .filter_map(|split| pushed_records(state, sealing, split, &mut budget))
                .collect();
            let request = proto::SealRequest {
                interval: sealing.interval.0,
                timeline: Some(timeline),
                replica_address: replica.map(|r| r.address.clone()).unwrap_or_default(),
                replica_worker: replica.map_or(0, |r| r.id),
                watermarks: sealing.watermarks.clone(),
                splits,
                pushed,
            };
            (id, request)
        })
        .collect()
}

/// At most about how many bytes of pushed records one seal request carries (one body
/// more may go over): the request stays well under the gRPC message limit whatever
/// the backlog, and what is left waits for the next seal.
const SEAL_PUSHED_BYTES: u64 = 96 << 20;

/// For a pushed source's receiver: the records its inbox holds from where the
/// receiver stands after every seal known (recorded, in progress, ahead), which this
/// seal takes, within what is left of the request's `budget`.
fn pushed_records(
    state: &EngineState,
    sealing: &Sealing,
    split: &proto::ReceiverSplit,
    budget: &mut u64,
) -> Option<(String, proto::PushedRecords)> {
    let slot = state.sources.get(&split.source)?;
    let inbox = slot.inbox.as_ref()?;
    let sealed = [
        Some(sealing),
        state.sealing.as_ref(),
        state.sealed_ahead.as_ref(),
    ];
    let position = slot.position(&split.source, split.split, sealed.into_iter().flatten());
    let pushed = inbox.from(position.pushed_until, *budget);
    *budget = budget.saturating_sub(pushed.bytes);
    let records = match ipc_bytes(&inbox.def.record_schema, &pushed.batches) {
        Ok(records) => records,
        Err(e) => {
            // Not reached with batches the inbox decoded; the seal carries nothing.
            warn!(source = %split.source, error = %e, "could not encode the records pushed");
            return None;
        }
    };
    Some((
        split.source.clone(),
        proto::PushedRecords {
            records,
            malformed: pushed.malformed,
            until: pushed.until,
        },
    ))
}

/// Sends each worker its seal request; each worker's answer.
async fn send_seals(
    cluster: &Cluster,
    requests: Vec<(u64, proto::SealRequest)>,
) -> Vec<(u64, Result<proto::SealResponse>)> {
    join_all(
        requests
            .into_iter()
            .map(|(id, request)| send_seal(cluster, id, request)),
    )
    .await
}

/// Sends worker `id` its seal request; its answer.
async fn send_seal(
    cluster: &Cluster,
    id: u64,
    request: proto::SealRequest,
) -> (u64, Result<proto::SealResponse>) {
    let result = match cluster.get(id) {
        Some(w) => {
            cluster
                .call(id, "seal the interval", w.client.seal(request))
                .await
        }
        None => Err(Error::WorkerLost(cluster.unavailable(id))),
    };
    (id, result)
}

/// Records in `sealing` what each receiver sealed, and the workers whose seal failed
/// (see [`fail_receivers`]). A worker lost meanwhile sealed nothing this records:
/// this says why, and its receivers seal again once recovery reopened them.
fn record_seals(
    cluster: &Cluster,
    sealing: &mut Sealing,
    answers: Vec<(u64, Result<proto::SealResponse>)>,
) -> Option<String> {
    let mut lost = None;
    for (worker, result) in answers {
        match result {
            Ok(response) => {
                for split in response.sources {
                    sealing
                        .splits
                        .insert((split.source.clone(), split.split), split);
                }
            }
            Err(e) if !cluster.is_alive(worker) => {
                lost.get_or_insert(e.to_string());
            }
            Err(e) => sealing.failed.push((worker, e.to_string())),
        }
    }
    lost
}

/// Fails the sources with a receiver on a worker whose seal of `sealing`'s interval
/// failed.
fn fail_receivers(sources: &mut BTreeMap<String, SourceSlot>, sealing: &mut Sealing) {
    for (worker, error) in std::mem::take(&mut sealing.failed) {
        for (name, slot) in sources.iter_mut() {
            if slot.receivers.uses(worker) && slot.failure.is_none() {
                warn!(source = %name, %error, "source lost a receiver");
                slot.failure = Some(format!("a receiver could not seal: {error}"));
            }
        }
    }
}

/// Seals `interval` on the receivers that have not sealed it yet (in an earlier
/// attempt, or ahead while the previous interval ran), and records its input in each
/// source (stats, positions, retained blocks). Returns each source's blocks.
async fn seal(
    cluster: &Cluster,
    state: &mut EngineState,
    interval: IntervalId,
    commit: CommitOptions,
    alive: &[WorkerRecord],
    timeline: proto::Timeline,
) -> std::result::Result<HashMap<String, Vec<BlockInfo>>, Interrupted> {
    let mut sealing = state
        .take_sealing(interval)
        .unwrap_or_else(|| Sealing::new(interval, &state.sources));
    // Seals ahead that failed fail their sources now.
    fail_receivers(&mut state.sources, &mut sealing);
    let requests = seal_requests(state, &sealing, alive, timeline);
    let answers = send_seals(cluster, requests).await;
    let lost = record_seals(cluster, &mut sealing, answers);
    fail_receivers(&mut state.sources, &mut sealing);
    let mut sealed: HashMap<String, Vec<proto::SealedSource>> = HashMap::new();
    for ((name, _), split) in &sealing.splits {
        sealed.entry(name.clone()).or_default().push(split.clone());
    }
    state.sealing = Some(sealing);
    if let Some(reason) = lost {
        return Err(Interrupted::by(reason));
    }
    let mut blocks: HashMap<String, Vec<BlockInfo>> = HashMap::new();
    for (name, splits) in sealed {
        let Some(slot) = state.sources.get_mut(&name) else {
            continue;
        };
        if slot.failure.is_some() {
            continue;
        }
        if let Some(failed) = splits.iter().find(|s| !s.failure.is_empty()) {
            warn!(source = %name, error = %failed.failure, "source failed and stopped");
            slot.failure = Some(failed.failure.clone());
            continue;
        }
        if splits.len() < slot.receivers.len() {
            let failure = format!(
                "{} of its {} receivers did not seal interval {interval}",
                slot.receivers.len().saturating_sub(splits.len()),
                slot.receivers.len()
            );
            warn!(source = %name, error = %failure, "source failed and stopped");
            slot.failure = Some(failure);
            continue;
        }
        // The source's counters are the sums over its receivers; its watermark the
        // highest any of them reached (each dropped late rows against the same one).
        slot.stats.receiver.records = splits.iter().map(|s| s.records).sum();
        slot.stats.receiver.malformed = splits.iter().map(|s| s.malformed).sum();
        slot.stats.late_rows = splits.iter().map(|s| s.late_rows).sum();
        slot.stats.watermark = splits
            .iter()
            .filter_map(|s| s.watermark)
            .max()
            .max(slot.stats.watermark);
        // Where each receiver stands, in case its worker is lost.
        slot.positions
            .resize_with(slot.receivers.len(), Default::default);
        for split in &splits {
            if let Some(position) = slot.positions.get_mut(split.split as usize) {
                position.advance(split);
            }
        }
        // What a pushed source's receivers sealed is in blocks now.
        if let Some(inbox) = &slot.inbox {
            let sealed = slot.positions.iter().map(|p| p.pushed_until).min();
            inbox.release(sealed.unwrap_or(0));
        }
        let infos = blocks_of(interval, &splits);
        slot.retain(
            SealedInterval {
                interval,
                blocks: infos.clone(),
                watermark: slot.stats.watermark,
            },
            commit.lineage,
        );
        blocks.insert(name, infos);
    }
    Ok(blocks)
}

/// Maps, reduces and commits `interval`, whose input is `blocks` (sealed since
/// `started`). Stages run in levels: a stage that reads a source is in level 0, one
/// that reads a stage (of its view, or another view's last) one level above it; each
/// level maps and reduces before the next maps over the changes it made.
async fn run_stages(
    engine: &Engine,
    state: &mut EngineState,
    interval: IntervalId,
    commit: CommitOptions,
    alive: &[WorkerRecord],
    mut blocks: HashMap<String, Vec<BlockInfo>>,
    started: Instant,
) -> IntervalResult {
    let sealed_at = started.elapsed();
    let cluster = engine.inner.cluster.clone();
    let speculation = engine.inner.config.speculation;
    let timeline = state.timeline;
    let mut counts = StageCounts {
        workers: alive.len() as u64,
        ..Default::default()
    };
    if let Some(reason) = lost_worker(&cluster, alive, false).await {
        return Err(Interrupted::by(reason));
    }
    let mut failed: HashMap<String, String> = HashMap::new();
    let mut next_task = 0u64;
    let views: Vec<(String, Arc<StreamPlan>, Placement)> = state
        .views
        .iter()
        .filter(|(_, v)| v.runs_in(interval))
        .map(|(n, v)| (n.clone(), v.plan.clone(), v.placement.clone()))
        .collect();
    let levels = state.stage_levels();
    let retain = state.retain_intervals(engine.inner.config.source_retention);
    // Stages other stages read keep their changes on the workers for them.
    let read: HashSet<&str> = views
        .iter()
        .flat_map(|(_, plan, _)| plan.inputs.iter().map(String::as_str))
        .collect();
    // Map outputs started ahead, while the interval before ran, stand for the views
    // whose plan and blocks are still these.
    let mut ahead = match state.mapped_ahead.take() {
        Some(ahead) => ahead.outcome(&cluster, interval).await,
        None => None,
    };
    if let Some(ahead) = &ahead {
        counts.speculative_tasks = counts
            .speculative_tasks
            .saturating_add(ahead.stage.speculated);
        note_outrun(state, &ahead.stage.outrun, interval);
    }
    let mut changes: HashMap<String, Vec<(u32, Changelog, u64)>> = HashMap::new();
    let mut stats: HashMap<String, StageStats> = HashMap::new();
    let top = views
        .iter()
        .map(|(name, ..)| levels.get(name).copied().unwrap_or(0))
        .max()
        .unwrap_or(0);
    let mut mapped_at = sealed_at;
    for level in 0..=top {
        let stages: Vec<&(String, Arc<StreamPlan>, Placement)> = views
            .iter()
            .filter(|(name, ..)| levels.get(name).copied().unwrap_or(0) == level)
            .collect();
        // 2. Map: one task per (stage, block), where the block is if the load allows
        // (see `place_map_tasks`); a stage's changes are mapped where they were made.
        let mut map_load: HashMap<u64, usize> = HashMap::new();
        let mut stage_tasks: Vec<StageTask> = Vec::new();
        let mut map_of_task: HashMap<u64, (String, u32)> = HashMap::new();
        let mut map_outputs: HashMap<String, Vec<MapOutput>> = HashMap::new();
        for (name, plan, placement) in &stages {
            let upstream = plan.inputs.iter().find_map(|input| {
                let reason = failed
                    .get(input)
                    .cloned()
                    .or_else(|| state.views.get(input).and_then(|s| s.failure.clone()))?;
                Some(format!("{input} failed: {reason}"))
            });
            if let Some(reason) = upstream {
                failed.insert(name.clone(), reason);
                continue;
            }
            if let Some(lost) = placement.workers().find(|w| !cluster.is_alive(*w)) {
                // Recovery could not move it (it says why when it gives up).
                failed.insert(
                    name.clone(),
                    format!(
                        "a state partition is on {}, and was not recovered",
                        cluster.unavailable(lost)
                    ),
                );
                continue;
            }
            let rows_in = plan
                .inputs
                .iter()
                .flat_map(|input| blocks.get(input).into_iter().flatten())
                .map(|b| b.rows)
                .fold(0u64, u64::saturating_add);
            stats.entry(name.clone()).or_default().rows_in = rows_in;
            let source_blocks = blocks.get(&plan.source).map(Vec::as_slice).unwrap_or(&[]);
            if let Some(outputs) = ahead
                .as_mut()
                .filter(|_| plan.inputs.len() == 1)
                .and_then(|a| a.take(&cluster, (name, plan), source_blocks))
            {
                counts.map_tasks = counts.map_tasks.saturating_add(outputs.len() as u64);
                counts.map_tasks_ahead =
                    counts.map_tasks_ahead.saturating_add(outputs.len() as u64);
                map_outputs.insert(name.clone(), outputs);
                continue;
            }
            for (input, source) in plan.inputs.iter().enumerate() {
                let input_blocks = blocks.get(source).map(Vec::as_slice).unwrap_or(&[]);
                match map_tasks(
                    (name, (input as u32, source)),
                    interval,
                    input_blocks,
                    &[],
                    (&cluster, &state.outrun),
                    (&mut map_load, &mut next_task),
                ) {
                    Ok(tasks) => {
                        for (task, piece) in tasks {
                            map_of_task.insert(task.task.id, (name.clone(), piece));
                            stage_tasks.push(task);
                        }
                    }
                    Err(failure) => {
                        failed.insert(name.clone(), failure);
                        break;
                    }
                }
            }
        }
        counts.map_tasks = counts.map_tasks.saturating_add(map_of_task.len() as u64);
        let mut stage = run_stage(
            &cluster,
            stage_tasks,
            "run map tasks",
            speculation,
            &mut next_task,
        )
        .await;
        counts.speculative_tasks = counts.speculative_tasks.saturating_add(stage.speculated);
        note_outrun(state, &stage.outrun, interval);
        for (id, (_, r)) in &stage.results {
            if let Some((view, _)) = map_of_task.get(id) {
                let stage_stats = stats.entry(view.clone()).or_default();
                stage_stats.task_micros = stage_stats.task_micros.saturating_add(r.micros);
            }
        }
        map_outputs.extend(self::map_outputs(
            std::mem::take(&mut stage.results),
            &map_of_task,
        ));
        for (id, (_, error)) in &stage.lost {
            if let Some((view, _)) = map_of_task.get(id) {
                failed.entry(view.clone()).or_insert_with(|| error.clone());
            }
        }
        if let Some(reason) = lost_worker(&cluster, alive, !failed.is_empty()).await {
            return Err(Interrupted {
                reason,
                suspects: suspects(&cluster, &stage, &map_of_task),
            });
        }

        mapped_at = started.elapsed();
        // 3. Reduce: one task per (stage, partition) where the state partition lives.
        let mut reduce_tasks: Vec<StageTask> = Vec::new();
        let mut reduce_of_task: HashMap<u64, (String, u32)> = HashMap::new();
        for (name, plan, placement) in &stages {
            if failed.contains_key(name) {
                continue;
            }
            let watermark = window_watermark(
                plan.window.as_ref(),
                interval,
                &timeline,
                state
                    .sources
                    .get(&plan.source)
                    .and_then(|s| s.stats.watermark),
            );
            let mut outputs = map_outputs.remove(name).unwrap_or_default();
            outputs.sort_by_key(|o| o.block);
            let mode = ReduceMode {
                replay: false,
                keep_changes: read.contains(name.as_str()),
                // Changes go to the coordinator only for subscribers.
                withhold_changes: plan.name != plan.view || !engine.wants_changes(name),
            };
            for (p, owner) in placement.iter() {
                let of = ReduceOf {
                    stage: name,
                    interval: interval.0,
                    partition: p,
                    pieces: pieces_for(&cluster, &outputs, p as usize),
                    watermark,
                };
                next_task = next_task.saturating_add(1);
                reduce_of_task.insert(next_task, (name.clone(), p));
                // A copy may run on any other live worker: it fetches the partition.
                let alternatives = alive.iter().map(|w| w.id).collect();
                reduce_tasks.push(StageTask::reduce(next_task, owner, of, mode, alternatives));
            }
        }
        counts.reduce_tasks = counts
            .reduce_tasks
            .saturating_add(reduce_of_task.len() as u64);
        let mut stage = run_stage(
            &cluster,
            reduce_tasks,
            "run reduce tasks",
            speculation,
            &mut next_task,
        )
        .await;
        counts.speculative_tasks = counts.speculative_tasks.saturating_add(stage.speculated);
        note_outrun(state, &stage.outrun, interval);
        for (id, (worker, r)) in std::mem::take(&mut stage.results) {
            let Some((view, p)) = reduce_of_task.get(&id) else {
                continue;
            };
            // A copy that won moved the state partition to its worker.
            if let Some(slot) = state.views.get_mut(view)
                && let Some(from) = slot.placement.move_to(*p, worker)
            {
                info!(view = %view, partition = p, from, to = worker, "a speculative copy won; the state partition moved");
            }
            counts.shuffle_bytes = counts.shuffle_bytes.saturating_add(r.shuffle_bytes_read);
            let reduced = StageStats {
                rows_out: r.changed_rows,
                state_rows: r.view_rows,
                state_bytes: r.state_bytes,
                task_micros: r.micros,
                ..Default::default()
            };
            let stage_stats = stats.entry(view.clone()).or_default();
            *stage_stats = stage_stats.plus(reduced);
            // The stages that read this one map its changes where they were kept.
            if read.contains(view.as_str()) && r.changed_rows > 0 {
                blocks.entry(view.clone()).or_default().push(BlockInfo {
                    interval,
                    index: *p,
                    rows: r.changed_rows,
                    bytes: r.changed_bytes,
                    holders: vec![worker],
                });
            }
            let changelog = read_ipc(&r.deletes).and_then(|deletes| {
                Ok(Changelog {
                    deletes,
                    inserts: read_ipc(&r.inserts)?,
                })
            });
            match changelog {
                Ok(c) => changes
                    .entry(view.clone())
                    .or_default()
                    .push((*p, c, r.view_rows)),
                Err(e) => {
                    failed.entry(view.clone()).or_insert(e.to_string());
                }
            }
        }
        for (id, (_, error)) in &stage.lost {
            if let Some((view, _)) = reduce_of_task.get(id) {
                failed.entry(view.clone()).or_insert_with(|| error.clone());
            }
        }
        if let Some(reason) = lost_worker(&cluster, alive, !failed.is_empty()).await {
            return Err(Interrupted {
                reason,
                suspects: suspects(&cluster, &stage, &reduce_of_task),
            });
        }
        for stage_blocks in blocks.values_mut() {
            stage_blocks.sort_by_key(|b| b.index);
        }
        // Where each read stage's changes are kept, for a recovery to replay them.
        for (name, ..) in &stages {
            if !read.contains(name.as_str()) || failed.contains_key(name) {
                continue;
            }
            let kept = SealedInterval {
                interval,
                blocks: blocks.get(name).cloned().unwrap_or_default(),
                watermark: None,
            };
            if let Some(slot) = state.views.get_mut(name) {
                slot.record_changes(kept, commit.lineage, retain);
            }
        }
    }

    let reduced_at = started.elapsed();
    // 4. Commit everywhere. A worker that cannot commit fails the views it holds,
    // unless it was lost: recovery then replays this interval into its partitions.
    let request = proto::CommitRequest {
        interval: interval.0,
        checkpoint: commit.checkpoint,
        keep_from: commit.lineage.map(|c| c.0),
        replay: false,
    };
    let commits = cluster
        .call_each(alive, "commit the interval", |client| async move {
            client.commit(request).await
        })
        .await;
    for (worker, result) in commits {
        if let Err(e) = result
            && cluster.is_alive(worker)
        {
            for (name, slot) in &state.views {
                if slot.placement.uses(worker) {
                    failed.entry(name.clone()).or_insert(e.to_string());
                }
            }
        }
    }

    tracing::debug!(
        %interval,
        seal = ?sealed_at,
        map = ?mapped_at.saturating_sub(sealed_at),
        reduce = ?reduced_at.saturating_sub(mapped_at),
        commit = ?started.elapsed().saturating_sub(reduced_at),
        "interval stages"
    );
    let mut outcomes = BTreeMap::new();
    for (name, _, placement) in &views {
        if let Some(reason) = failed.remove(name) {
            outcomes.insert(name.clone(), ViewOutcome::Failed(reason));
            continue;
        }
        let mut parts = changes.remove(name).unwrap_or_default();
        parts.sort_by_key(|(p, ..)| *p);
        let mut changelog = Changelog::default();
        let mut partition_rows = vec![0; placement.len()];
        for (p, c, rows) in parts {
            changelog.extend(c);
            if let Some(slot) = partition_rows.get_mut(p as usize) {
                *slot = rows;
            }
        }
        outcomes.insert(
            name.clone(),
            ViewOutcome::Done {
                changelog,
                partition_rows,
                stats: stats.remove(name).unwrap_or_default(),
            },
        );
    }
    Ok((outcomes, counts))
}

/// Installs the catalog on every live worker that does not have its current version,
/// placing receivers and state partitions that have no worker yet. Returns the first
/// error of installing on a worker, after marking what it concerned as failed.
pub async fn sync_workers(engine: &Engine, state: &mut EngineState) -> Result<()> {
    let cluster = engine.inner.cluster.clone();
    let alive = cluster.alive();
    if alive.is_empty() {
        return Ok(());
    }
    place(state, &alive);
    let started = Instant::now();
    let objects: Vec<proto::CatalogObject> = state
        .catalog
        .iter()
        .map(|o| proto::CatalogObject {
            kind: match o.kind() {
                dstream_planner::ObjectKind::Source => "source",
                dstream_planner::ObjectKind::Table => "table",
                dstream_planner::ObjectKind::MaterializedView => "view",
            }
            .to_string(),
            name: o.name().to_string(),
            sql: o.sql().to_string(),
        })
        .collect();
    let retention = engine.inner.config.source_retention.as_nanos();
    let retain_intervals = retention
        .checked_div(state.timeline.width().as_nanos())
        .unwrap_or(retention)
        .max(1) as u64;
    let config = &engine.inner.config;
    let store = proto::Store {
        url: engine.inner.data_dir.url().to_string(),
        s3_endpoint: config.s3.endpoint.clone().unwrap_or_default(),
        s3_region: config.s3.region.clone().unwrap_or_default(),
        s3_allow_http: config.s3.allow_http,
    };
    let mut first_error = None;
    for worker in alive.iter().filter(|w| w.installed < state.catalog_version) {
        let receivers: Vec<proto::ReceiverSplit> = state
            .sources
            .iter()
            .filter(|(_, s)| s.failure.is_none())
            .flat_map(|(name, s)| {
                let splits = s.receivers.len() as u32;
                s.receivers
                    .on(worker.id)
                    .map(move |split| proto::ReceiverSplit {
                        source: name.clone(),
                        split,
                        splits,
                    })
            })
            .collect();
        let request = proto::InstallRequest {
            timeline: Some(timeline_message(&state.timeline)),
            objects: objects.clone(),
            receivers: receivers.clone(),
            block_rows: engine.inner.config.block_rows as u64,
            partitions: engine.inner.config.partitions as u32,
            retain_intervals,
            store: Some(store.clone()),
        };
        match cluster
            .call(
                worker.id,
                "install the catalog",
                worker.client.install(request),
            )
            .await
        {
            Ok(_) => {
                if let Err(e) = push_tables(engine, state, worker).await {
                    first_error.get_or_insert(e);
                    continue;
                }
                cluster.set_installed(worker.id, state.catalog_version);
            }
            Err(e) => {
                warn!(worker = worker.id, error = %e, "could not install the catalog");
                first_error.get_or_insert(e);
            }
        }
    }
    if started.elapsed() > Duration::from_millis(500) {
        tracing::info!(elapsed = ?started.elapsed(), "installed the catalog on workers");
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Gives receivers and state partitions that have none a live worker. A source whose
/// connector splits gets one receiver per live worker, others one; each receiver goes
/// to the worker with the fewest. Partitions go round-robin from a per-view offset.
fn place(state: &mut EngineState, alive: &[WorkerRecord]) {
    let alive: Vec<u64> = alive.iter().map(|w| w.id).collect();
    let mut receivers = Load::new(
        alive.iter().copied(),
        state.sources.values().map(|s| &s.receivers),
    );
    for slot in state.sources.values_mut() {
        if slot.receivers.is_placed() || slot.failure.is_some() {
            continue;
        }
        let splits = if dstream_executor::connector::splittable(&slot.def) {
            alive.len()
        } else {
            1
        };
        for _ in 0..splits {
            if let Some(worker) = receivers.pick() {
                slot.receivers.push(worker);
            }
        }
    }
    let placed_views = state
        .views
        .values()
        .filter(|v| v.placement.is_placed())
        .count();
    for (offset, slot) in state
        .views
        .values_mut()
        .filter(|v| !v.placement.is_placed())
        .enumerate()
    {
        let start = placed_views.saturating_add(offset);
        slot.placement = Placement::spread(&alive, slot.plan.partitions, start);
    }
}

/// Sends the rows of every memory table to `worker`, for views that join them.
pub async fn push_tables(
    engine: &Engine,
    state: &EngineState,
    worker: &WorkerRecord,
) -> Result<()> {
    for (name, slot) in &state.tables {
        if let crate::state::TableSlot::Memory(table) = slot {
            put_table(engine, &worker.address, name, table).await?;
        }
    }
    Ok(())
}

async fn put_table(
    engine: &Engine,
    address: &str,
    name: &str,
    table: &datafusion::catalog::MemTable,
) -> Result<()> {
    let kind = proto::data_ticket::Kind::Table(proto::TableRef {
        name: name.to_string(),
    });
    let schema = datafusion::catalog::TableProvider::schema(table);
    let rows = crate::state::memory_rows(table).await;
    Ok(engine
        .inner
        .cluster
        .peers
        .put(address, kind, schema, rows)
        .await?)
}

/// Sends a memory table's rows to every live worker.
pub async fn push_table(
    engine: &Engine,
    name: &str,
    table: &datafusion::catalog::MemTable,
) -> Result<()> {
    let alive = engine.inner.cluster.alive();
    let puts = alive
        .iter()
        .map(|w| put_table(engine, &w.address, name, table));
    for result in join_all(puts).await {
        result?;
    }
    Ok(())
}

/// Tells every live worker to forget `name`; a worker that cannot be told is logged.
pub async fn remove_everywhere(engine: &Engine, name: &str) {
    let cluster = &engine.inner.cluster;
    let request = proto::RemoveRequest {
        name: name.to_string(),
    };
    let removed = cluster
        .call_each(&cluster.alive(), "remove an object", |client| {
            let request = request.clone();
            async move { client.remove(request).await }
        })
        .await;
    for (worker, result) in removed {
        if let Err(e) = result {
            warn!(worker, error = %e, "could not remove an object from a worker");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(index: u32, holders: &[u64]) -> BlockInfo {
        BlockInfo {
            interval: IntervalId(0),
            index,
            rows: 1,
            bytes: 1,
            holders: holders.to_vec(),
        }
    }

    #[test]
    fn map_tasks_run_where_blocks_were_received_while_that_is_even() {
        // Two receivers, four blocks each, each replicated to the other worker.
        let mut blocks: Vec<BlockInfo> = (0..4).map(|i| block(i, &[1, 2])).collect();
        blocks.extend((4..8).map(|i| block(i, &[2, 1])));
        let mut load = HashMap::new();
        let placed = place_map_tasks(&blocks, |_| true, &mut load);
        assert_eq!(placed, Ok(vec![1, 1, 1, 1, 2, 2, 2, 2]));
    }

    #[test]
    fn map_tasks_move_to_replicas_to_even_the_load() {
        // One receiver on worker 1: half its blocks go to the replica on worker 2.
        let blocks: Vec<BlockInfo> = (0..6).map(|i| block(i, &[1, 2])).collect();
        let mut load = HashMap::new();
        let placed = place_map_tasks(&blocks, |_| true, &mut load).unwrap_or_default();
        assert_eq!(placed.iter().filter(|w| **w == 1).count(), 3);
        assert_eq!(load, HashMap::from([(1, 3), (2, 3)]));
        // A dead first holder: its replica takes every task.
        let mut load = HashMap::new();
        let placed = place_map_tasks(&blocks, |w| w != 1, &mut load);
        assert_eq!(placed, Ok(vec![2; 6]));
        // No live holder at all.
        let mut load = HashMap::new();
        assert_eq!(place_map_tasks(&blocks, |_| false, &mut load), Err(0));
    }
}
