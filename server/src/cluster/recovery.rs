//! Parallel recovery: rebuilding what a dead worker held on the workers that survive.
//!
//! Between two intervals (or between two attempts of one, see `scheduler`), under the
//! engine's state lock, [`recover`] finds the receivers and state partitions that are
//! on dead workers and moves them:
//! - each receiver is reopened on the survivor with the fewest, where the
//!   coordinator last knew it to stand (counters, watermark, files read); sources
//!   whose records are a function of the interval (generator, nexmark) and file
//!   sources lose nothing, a `tcp` source loses what its connections sent since
//!   the last seal;
//! - each state partition goes to the survivor with the fewest, which loads it from
//!   the latest committed checkpoint (or starts it empty when the view began after
//!   it), and the input since is replayed into it, interval by interval: map tasks
//!   over the blocks, on any live worker holding them, and reduce tasks for the lost
//!   partitions only, marked `replay` so that nothing is published twice. Many
//!   partitions are rebuilt on many workers at once; the state of the partitions
//!   that were not lost is not touched.
//!
//! Only when every lost partition of a view is rebuilt does its placement change, so
//! a recovery cut short by another lost worker is simply done again. Something that
//! cannot be rebuilt (no survivor, input no longer held) stops the view or source
//! with a message saying why. Each recovery is logged and shown in
//! `dstream_recoveries`, and asks for a checkpoint at the next commit, since the
//! replayed input may now be held by a single worker.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use dstream_executor::rpc::proto;
use dstream_executor::view_runtime::window_watermark;
use dstream_storage::IntervalId;
use dstream_storage::checkpoint::{PartitionCheckpoint, WrittenPartition};
use futures::future::join_all;
use tracing::{info, warn};

use super::scheduler::{self, CommitOptions, Interrupted, MapOutput};
use super::stage::{ReduceMode, ReduceOf, StageTask, run_stage};
use super::{Cluster, WorkerRecord, WorkerStatus};
use crate::engine::Engine;
use crate::state::{BlockInfo, EngineState, Load, SealedInterval, Sealing};

/// One recovery, as `dstream_recoveries` shows it.
#[derive(Clone, Debug)]
pub struct RecoveryStat {
    /// When it started (wall clock, nanoseconds since the epoch).
    pub started_at_nanos: i64,
    /// The interval about to run when it started.
    pub interval: IntervalId,
    /// The dead workers whose work it moved.
    pub workers: Vec<u64>,
    pub receivers: u64,
    pub partitions: u64,
    /// The checkpoint lost partitions were loaded from (the latest one used).
    pub checkpoint: Option<IntervalId>,
    /// Intervals of input replayed.
    pub replayed_intervals: u64,
    pub duration: Duration,
    /// Why it did not complete, if it did not.
    pub error: Option<String>,
}

/// How long recovery waits for a local worker that `dstream serve` is starting again
/// when no other worker is alive.
const RESTARTED_WORKER: Duration = Duration::from_secs(30);

/// The lost partitions of one view and how they are rebuilt.
#[derive(Debug)]
struct Rebuild {
    view: String,
    partitions: Vec<LostPartition>,
    /// Whether the input of all the intervals replayed may be folded into each
    /// partition at once, by one reduce task: nothing of the view's state depends
    /// on an interval's watermark (it has no window), so folding several intervals'
    /// rows in one go leaves the state that folding them one by one does.
    fold: bool,
    /// Other stages read this one: each replayed interval keeps its changes (the
    /// readers' lost partitions replay them), so intervals are not folded.
    keep_changes: bool,
    /// Level of the stage (see `EngineState::stage_levels`): a level's rebuilds
    /// replay after the levels below, whose changes they may read.
    level: usize,
    /// Intervals replayed: from the earliest a partition needs to the view's last.
    from: IntervalId,
    to: IntervalId,
}

/// One lost partition and how it is rebuilt.
#[derive(Debug)]
struct LostPartition {
    partition: u32,
    target: WorkerRecord,
    /// The checkpoint it is loaded from, and what that holds of it (`None`: it
    /// starts empty).
    checkpoint: Option<(IntervalId, Option<PartitionCheckpoint>)>,
    /// The first interval replayed into it: the one after its checkpoint, or the
    /// view's first.
    from: IntervalId,
}

/// Whether worker `id` is dead (or unknown): its work must be recovered. Leaving
/// workers hand their work over instead; workers that left have done so.
fn is_lost(cluster: &Cluster, id: u64) -> bool {
    cluster
        .get(id)
        .is_none_or(|w| matches!(w.status, WorkerStatus::Dead(_)))
}

/// Recovers the receivers and state partitions of dead workers; `None` if there were
/// none. `lineage` is what commits keep of the input (see [`CommitOptions`]).
pub async fn recover(
    engine: &Engine,
    state: &mut EngineState,
    lineage: Option<IntervalId>,
) -> Option<RecoveryStat> {
    let cluster = engine.inner.cluster.clone();
    let mut lost = BTreeSet::new();
    for slot in state.sources.values().filter(|s| s.failure.is_none()) {
        lost.extend(slot.receivers.workers().filter(|w| is_lost(&cluster, *w)));
    }
    for view in state.views.values().filter(|v| v.failure.is_none()) {
        lost.extend(view.placement.workers().filter(|w| is_lost(&cluster, *w)));
    }
    if lost.is_empty() {
        return None;
    }
    let started = Instant::now();
    let mut stat = RecoveryStat {
        started_at_nanos: chrono::Utc::now().timestamp_nanos_opt().unwrap_or(0),
        interval: state.next,
        workers: lost.iter().copied().collect(),
        receivers: 0,
        partitions: 0,
        checkpoint: None,
        replayed_intervals: 0,
        duration: Duration::ZERO,
        error: None,
    };
    let described = lost
        .iter()
        .map(|w| cluster.unavailable(*w))
        .collect::<Vec<_>>()
        .join("; ");
    let mut survivors = cluster.alive();
    if survivors.is_empty() && engine.inner.supervision.restarting() {
        // `dstream serve` is starting its dead workers again: recover on them.
        info!(lost = %described, "no live worker; waiting for a local worker to be restarted");
        let _ = cluster.wait_for_workers(1, RESTARTED_WORKER).await;
        survivors = cluster.alive();
    }
    if survivors.is_empty() {
        let reason = format!("no live worker is left to recover on ({described})");
        warn!(%reason, "cannot recover");
        stop_dependents(state, &lost, &reason);
        stat.error = Some(reason);
        stat.duration = started.elapsed();
        return Some(stat);
    }
    info!(lost = %described, survivors = survivors.len(), "recovering the work of lost workers");
    if let Err(e) = scheduler::sync_workers(engine, state).await {
        warn!(error = %e, "could not install the catalog on every worker before recovering");
    }
    stat.receivers = reopen_receivers(&cluster, state, &lost, &survivors).await;
    if let Err(Interrupted { reason, .. }) =
        rebuild_partitions(engine, state, &lost, &survivors, lineage, &mut stat).await
    {
        // Placements of what was not finished still name the dead worker: the next
        // attempt recovers it again.
        warn!(%reason, "recovery was cut short by another lost worker");
        stat.error = Some(format!("cut short: {reason}"));
    }
    stat.duration = started.elapsed();
    info!(
        receivers = stat.receivers,
        partitions = stat.partitions,
        checkpoint = ?stat.checkpoint.map(|c| c.0),
        replayed_intervals = stat.replayed_intervals,
        elapsed = ?stat.duration,
        "recovered the work of lost workers"
    );
    engine.checkpoints().request();
    engine.publish_snapshot(state);
    Some(stat)
}

/// Stops every view and source that needs one of `lost`.
fn stop_dependents(state: &mut EngineState, lost: &BTreeSet<u64>, reason: &str) {
    for slot in state.sources.values_mut() {
        if slot.failure.is_none() && slot.receivers.workers().any(|w| lost.contains(&w)) {
            slot.failure = Some(reason.to_string());
        }
    }
    for view in state.views.values_mut() {
        if view.failure.is_none() && view.placement.workers().any(|w| lost.contains(&w)) {
            view.failure = Some(reason.to_string());
        }
    }
}

/// Forgets the seals, of the interval in progress and of the one sealed ahead, of
/// receivers on `lost` workers whose blocks are on no live worker any more (the
/// receiver's worker and the one holding the copy died together): the receiver,
/// reopened where it stood before that seal, seals the interval again. Sources whose
/// records are a function of their position (`generator`, `nexmark`) and `file`
/// sources give the same rows again; a `tcp` source's lost rows are gone with the
/// workers either way.
fn forget_seals_of_lost_blocks(cluster: &Cluster, state: &mut EngineState, lost: &BTreeSet<u64>) {
    let unheld = |sealed: &dstream_executor::rpc::proto::SealedSource| {
        sealed
            .blocks
            .iter()
            .any(|b| b.holders.iter().all(|h| !cluster.is_alive(*h)))
    };
    for (name, slot) in &state.sources {
        for (split, worker) in slot.receivers.iter() {
            if !lost.contains(&worker) {
                continue;
            }
            let key = (name.clone(), split);
            let in_progress = state
                .sealing
                .as_ref()
                .and_then(|s| s.splits.get(&key))
                .is_some_and(unheld);
            if in_progress && let Some(sealing) = state.sealing.as_mut() {
                warn!(source = %name, split, interval = %sealing.interval, "the blocks of a seal are on no live worker; the interval is sealed again");
                sealing.splits.remove(&key);
            }
            let ahead = state
                .sealed_ahead
                .as_ref()
                .and_then(|s| s.splits.get(&key))
                .is_some_and(unheld);
            if (in_progress || ahead)
                && let Some(sealing) = state.sealed_ahead.as_mut()
            {
                sealing.splits.remove(&key);
            }
        }
    }
}

/// Reopens the receivers of `lost` workers on survivors; returns how many.
async fn reopen_receivers(
    cluster: &Cluster,
    state: &mut EngineState,
    lost: &BTreeSet<u64>,
    survivors: &[WorkerRecord],
) -> u64 {
    let mut load = Load::new(
        survivors.iter().map(|w| w.id),
        state.sources.values().map(|s| &s.receivers),
    );
    let mut reopened: u64 = 0;
    forget_seals_of_lost_blocks(cluster, state, lost);
    // A receiver carries on after every seal it answered, those of the interval in
    // progress (an attempt interrupted before it ran) and of the one sealed ahead.
    let sealed: Vec<&Sealing> = state
        .sealing
        .iter()
        .chain(state.sealed_ahead.iter())
        .collect();
    for (name, slot) in state.sources.iter_mut() {
        if slot.failure.is_some() {
            continue;
        }
        let splits = slot.receivers.len() as u32;
        let dead_splits: Vec<(u32, u64)> = slot
            .receivers
            .iter()
            .filter(|(_, w)| lost.contains(w))
            .collect();
        for (split, dead) in dead_splits {
            let Some(target) = load
                .pick()
                .and_then(|id| survivors.iter().find(|w| w.id == id))
            else {
                break;
            };
            let handover = slot
                .position(name, split, sealed.iter().copied())
                .handover(name, split, splits);
            match cluster
                .call(
                    target.id,
                    "reopen a receiver",
                    target.client.adopt_receiver(handover),
                )
                .await
            {
                Ok(_) => {
                    info!(source = %name, split, from = dead, to = target.id, "reopened the receiver of a lost worker");
                    slot.receivers.move_to(split, target.id);
                    reopened = reopened.saturating_add(1);
                }
                Err(e) => {
                    warn!(source = %name, split, error = %e, "could not reopen the receiver of a lost worker");
                    slot.failure = Some(format!(
                        "its receiver {split} was on {}, and could not be reopened on {}: {e}",
                        cluster.unavailable(dead),
                        target.describe()
                    ));
                    break;
                }
            }
        }
    }
    reopened
}

/// Rebuilds the state partitions of `lost` workers on survivors: load, then replay.
async fn rebuild_partitions(
    engine: &Engine,
    state: &mut EngineState,
    lost: &BTreeSet<u64>,
    survivors: &[WorkerRecord],
    lineage: Option<IntervalId>,
    stat: &mut RecoveryStat,
) -> std::result::Result<(), Interrupted> {
    let cluster = engine.inner.cluster.clone();
    let (manifest, unfinished) = {
        let checkpoints = engine.checkpoints();
        (checkpoints.latest(), checkpoints.unfinished())
    };
    let mut owned = Load::new(
        survivors.iter().map(|w| w.id),
        state.views.values().map(|v| &v.placement),
    );
    let levels = state.stage_levels();
    let mut rebuilds = Vec::new();
    let names: Vec<String> = state.views.keys().cloned().collect();
    for name in names {
        let Some(view) = state.views.get(&name) else {
            continue;
        };
        if view.failure.is_some() {
            continue;
        }
        let mut partitions = Vec::new();
        for (p, owner) in view.placement.iter() {
            if !lost.contains(&owner) {
                continue;
            }
            let Some(target) = owned
                .pick()
                .and_then(|id| survivors.iter().find(|w| w.id == id))
            else {
                continue;
            };
            partitions.push((p, target.clone()));
        }
        if partitions.is_empty() {
            continue;
        }
        let Some(last) = view.last_interval else {
            // The view has not run yet: there is no state to rebuild.
            if let Some(view) = state.views.get_mut(&name) {
                for (p, target) in &partitions {
                    view.placement.move_to(*p, target.id);
                }
            }
            continue;
        };
        let first = view.first_interval.unwrap_or(last);
        let sql = state.stage_sql(&name);
        // A stage that reads another stage, or that others read, is rebuilt from the
        // committed checkpoint alone: its partitions and those of the stages next to
        // it then start from the same interval.
        let chained = view
            .plan
            .inputs
            .iter()
            .any(|input| !state.sources.contains_key(input))
            || state.is_read(&name);
        let ran = |at: IntervalId| first <= at && at <= last;
        // The checkpoint holds this view if it was taken while the view ran, from
        // the same definition.
        let committed = manifest.as_ref().and_then(|m| {
            let at = IntervalId(m.interval);
            let held = m.views.get(&name)?;
            (ran(at)
                && Some(&held.sql) == sql.as_ref()
                && held.partitions.len() == view.placement.len())
            .then_some((at, held))
        });
        // A newer checkpoint that never committed (its writing lost a worker, maybe
        // this one) still holds the partitions whose writing finished.
        let newer =
            unfinished.filter(|at| !chained && ran(*at) && committed.is_none_or(|(c, _)| c < *at));
        let written = match (newer, &sql) {
            (Some(at), Some(sql)) => written_partitions(engine, at, &name, sql, &partitions).await,
            _ => HashMap::new(),
        };
        let partitions: Vec<LostPartition> = partitions
            .into_iter()
            .map(|(partition, target)| {
                let checkpoint = match (written.get(&partition), newer, committed) {
                    (Some(held), Some(at), _) => Some((at, Some(held.clone()))),
                    (_, _, Some((at, held))) => {
                        Some((at, held.partitions.get(partition as usize).cloned()))
                    }
                    _ => None,
                };
                let from = checkpoint.as_ref().map_or(first, |(at, _)| at.next());
                LostPartition {
                    partition,
                    target,
                    checkpoint,
                    from,
                }
            })
            .collect();
        let from = partitions.iter().map(|p| p.from).min().unwrap_or(first);
        let missing = (from.0..=last.0).map(IntervalId).find(|i| {
            view.plan
                .inputs
                .iter()
                .any(|input| state.input_of(input, *i).is_none())
        });
        if let Some(missing) = missing {
            let reason = format!(
                "its state partition(s) {} were on lost {}, and the input of interval {missing} needed to rebuild them is no longer held{}",
                partitions
                    .iter()
                    .map(|p| p.partition.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                partitions
                    .first()
                    .and_then(|p| view.placement.owner(p.partition))
                    .map_or_else(|| "a lost worker".into(), |w| cluster.unavailable(w)),
                if lineage.is_none() {
                    " (checkpoints are off, so input is kept only as long as source_retention says)"
                } else {
                    ""
                }
            );
            warn!(view = %name, %reason, "cannot rebuild a view");
            if let Some(view) = state.views.get_mut(&name) {
                view.failure = Some(reason);
            }
            continue;
        }
        let keep_changes = state.is_read(&name);
        rebuilds.push(Rebuild {
            fold: view.plan.window.is_none() && !keep_changes,
            keep_changes,
            level: levels.get(&name).copied().unwrap_or(0),
            view: name,
            partitions,
            from,
            to: last,
        });
    }
    if rebuilds.is_empty() {
        return Ok(());
    }
    stat.checkpoint = rebuilds
        .iter()
        .flat_map(|r| r.partitions.iter())
        .filter_map(|p| p.checkpoint.as_ref().map(|(at, _)| *at))
        .max();

    // Load every lost partition at once.
    let mut failed: BTreeMap<String, String> = BTreeMap::new();
    let restores = rebuilds.iter().flat_map(|r| {
        let cluster = &cluster;
        r.partitions.iter().map(move |lost| {
            let target = &lost.target;
            let request = restore_request(
                &r.view,
                lost.partition,
                lost.checkpoint
                    .as_ref()
                    .map(|(at, held)| (*at, held.as_ref())),
            );
            async move {
                let result = cluster
                    .call(
                        target.id,
                        "restore a state partition",
                        target.client.restore_partition(request),
                    )
                    .await;
                (r.view.clone(), target.id, result)
            }
        })
    });
    for (view, target, result) in join_all(restores).await {
        match result {
            Ok(_) => {}
            Err(e) if !cluster.is_alive(target) => return Err(Interrupted::by(e.to_string())),
            Err(e) => {
                failed
                    .entry(view)
                    .or_insert(format!("could not load its checkpoint: {e}"));
            }
        }
    }

    // Replay, a level of stages at a time: a stage's lost partitions read the
    // changes of the stage before it, which the level below kept (or replayed and
    // kept again). Within a level the map tasks of every replayed interval run at
    // once: they depend on their input alone, and produce the lost partitions' rows
    // only. Then, interval by interval, the lost partitions fold them in and commit.
    let top = rebuilds.iter().map(|r| r.level).max().unwrap_or(0);
    for level in 0..=top {
        let at_level: Vec<&Rebuild> = rebuilds.iter().filter(|r| r.level == level).collect();
        if at_level.is_empty() {
            continue;
        }
        let first_task = scheduler::reserve_task_ids(state);
        let outputs = replay_maps(engine, state, &at_level, first_task, &mut failed).await?;
        let (Some(first), Some(last)) = (
            at_level.iter().map(|r| r.from).min(),
            at_level.iter().map(|r| r.to).max(),
        ) else {
            continue;
        };
        // Views that fold their replayed input at once do so at their last interval;
        // the others reduce and commit interval by interval.
        for i in (first.0..=last.0).map(IntervalId) {
            let replayed: Vec<&Rebuild> = at_level
                .iter()
                .copied()
                .filter(|r| r.from <= i && i <= r.to && !failed.contains_key(&r.view))
                .collect();
            if replayed.is_empty() {
                continue;
            }
            stat.replayed_intervals = stat.replayed_intervals.saturating_add(1);
            let active: Vec<&Rebuild> = replayed
                .into_iter()
                .filter(|r| !r.fold || i == r.to)
                .collect();
            if active.is_empty() {
                continue;
            }
            let replay = Replay {
                interval: i,
                first_task: scheduler::reserve_task_ids(state),
                lineage,
            };
            let kept = replay_reduce(engine, state, &active, replay, &outputs, &mut failed).await?;
            // The replayed changes are where the readers' replay finds them now.
            let retain = state.retain_intervals(engine.inner.config.source_retention);
            for (view, changes) in kept {
                if let Some(slot) = state.views.get_mut(&view) {
                    let mut record = slot.changes_of(i).cloned().unwrap_or(SealedInterval {
                        interval: i,
                        blocks: Vec::new(),
                        watermark: None,
                    });
                    for (partition, block) in changes {
                        record.blocks.retain(|b| b.index != partition);
                        record.blocks.extend(block);
                    }
                    record.blocks.sort_by_key(|b| b.index);
                    slot.record_changes(record, lineage, retain);
                }
            }
        }
    }

    for rebuild in rebuilds {
        let Some(view) = state.views.get_mut(&rebuild.view) else {
            continue;
        };
        if let Some(reason) = failed.remove(&rebuild.view) {
            warn!(view = %rebuild.view, %reason, "could not rebuild a view's lost partitions");
            view.failure = Some(format!("while recovering from a lost worker: {reason}"));
            continue;
        }
        for lost in &rebuild.partitions {
            view.placement.move_to(lost.partition, lost.target.id);
        }
        stat.partitions = stat
            .partitions
            .saturating_add(rebuild.partitions.len() as u64);
    }
    Ok(())
}

/// The records of `view`'s lost `partitions` written for the unfinished checkpoint
/// of `at` from the same definition (`sql`), by partition. A record that cannot be
/// read counts as not written.
async fn written_partitions(
    engine: &Engine,
    at: IntervalId,
    view: &str,
    sql: &str,
    partitions: &[(u32, WorkerRecord)],
) -> HashMap<u32, PartitionCheckpoint> {
    let store = &engine.inner.data_dir;
    let reads = partitions
        .iter()
        .map(|(p, _)| WrittenPartition::read(store, at, view, *p));
    let mut written = HashMap::new();
    for ((p, _), read) in partitions.iter().zip(join_all(reads).await) {
        match read {
            Ok(Some(record)) if record.sql == sql && record.partition.partition == *p => {
                written.insert(*p, record.partition);
            }
            Ok(_) => {}
            Err(e) => {
                warn!(%view, partition = p, checkpoint = %at, error = %e, "could not read a partition's record in an unfinished checkpoint");
            }
        }
    }
    written
}

/// Where the map outputs of replayed intervals are, by interval and view, each in
/// block order.
type ReplayOutputs = HashMap<(IntervalId, String), Vec<MapOutput>>;

/// Runs the map tasks of every interval `rebuilds` replay in one stage, each
/// producing the rows of its view's lost partitions only. Task ids start at
/// `first_task` (see [`scheduler::reserve_task_ids`]). A view that fails goes into
/// `failed`.
async fn replay_maps(
    engine: &Engine,
    state: &EngineState,
    rebuilds: &[&Rebuild],
    first_task: u64,
    failed: &mut BTreeMap<String, String>,
) -> std::result::Result<ReplayOutputs, Interrupted> {
    let cluster = engine.inner.cluster.clone();
    let mut next_task = first_task;
    let mut load = HashMap::new();
    let no_stragglers = BTreeMap::new();
    let mut tasks: Vec<StageTask> = Vec::new();
    let mut of_task: HashMap<u64, ((IntervalId, String), u32)> = HashMap::new();
    for rebuild in rebuilds {
        let name = &rebuild.view;
        let Some(view) = state.views.get(name) else {
            continue;
        };
        if failed.contains_key(name) {
            continue;
        }
        for i in (rebuild.from.0..=rebuild.to.0).map(IntervalId) {
            let lost: Vec<u32> = rebuild
                .partitions
                .iter()
                .filter(|p| p.from <= i)
                .map(|p| p.partition)
                .collect();
            for (k, source) in view.plan.inputs.iter().enumerate() {
                let Some(input) = state.input_of(source, i) else {
                    failed.insert(
                        name.clone(),
                        format!("the input of interval {i} from {source} is no longer held"),
                    );
                    break;
                };
                let placed = scheduler::map_tasks(
                    (name, (k as u32, source)),
                    i,
                    &input.blocks,
                    &lost,
                    (&cluster, &no_stragglers),
                    (&mut load, &mut next_task),
                );
                match placed {
                    Ok(placed) => {
                        for (task, piece) in placed {
                            of_task.insert(task.task.id, ((i, name.clone()), piece));
                            tasks.push(task);
                        }
                    }
                    Err(e) => {
                        failed.insert(name.clone(), format!("in interval {i}, {e}"));
                        break;
                    }
                }
            }
            if failed.contains_key(name) {
                break;
            }
        }
    }
    let stage = run_stage(
        &cluster,
        tasks,
        "replay map tasks",
        engine.inner.config.speculation,
        &mut next_task,
    )
    .await;
    let mut outputs = scheduler::map_outputs(stage.results, &of_task);
    for mapped in outputs.values_mut() {
        mapped.sort_by_key(|o| o.block);
    }
    lost_tasks(
        &cluster,
        |id| of_task.get(&id).map(|((_, view), _)| view),
        stage.lost,
        failed,
    )?;
    Ok(outputs)
}

/// One replayed interval.
#[derive(Clone, Copy, Debug)]
struct Replay {
    interval: IntervalId,
    /// The first of the task ids its reduce tasks take (see
    /// [`scheduler::reserve_task_ids`]).
    first_task: u64,
    /// What its commit keeps of the input (see [`CommitOptions`]).
    lineage: Option<IntervalId>,
}

/// The changes replayed partitions of read stages kept, by stage: for each
/// partition, where its changes are (none: it had none).
type KeptChanges = HashMap<String, Vec<(u32, Option<BlockInfo>)>>;

/// Folds the mapped rows (from `outputs`) of one replayed interval — or, for views
/// that [`Rebuild::fold`], of every interval replayed up to it — into the lost
/// partitions of `active` views, with reduce tasks for those partitions only, and
/// commits the interval on their new owners. A view that fails goes into `failed`.
/// Returns where the stages that [`Rebuild::keep_changes`] kept them.
async fn replay_reduce(
    engine: &Engine,
    state: &EngineState,
    active: &[&Rebuild],
    replay: Replay,
    outputs: &ReplayOutputs,
    failed: &mut BTreeMap<String, String>,
) -> std::result::Result<KeptChanges, Interrupted> {
    let Replay {
        interval: i,
        first_task,
        lineage,
    } = replay;
    let cluster = engine.inner.cluster.clone();
    let alive = cluster.alive();
    let mut next_task = first_task;

    let mut reduce_tasks: Vec<StageTask> = Vec::new();
    let mut reduce_of_task: HashMap<u64, (String, u32)> = HashMap::new();
    let mut owners = BTreeSet::new();
    for rebuild in active {
        if failed.contains_key(&rebuild.view) {
            continue;
        }
        let Some(view) = state.views.get(&rebuild.view) else {
            continue;
        };
        let watermark = window_watermark(
            view.plan.window.as_ref(),
            i,
            &state.timeline,
            state
                .sources
                .get(&view.plan.source)
                .and_then(|s| s.input_of(i))
                .and_then(|input| input.watermark),
        );
        for lost in rebuild.partitions.iter().filter(|p| p.from <= i) {
            let (p, target) = (&lost.partition, &lost.target);
            let folded = if rebuild.fold { lost.from } else { i };
            // Interval by interval, each in block order: every run folds alike.
            let mut pieces = Vec::new();
            for j in (folded.0..=i.0).map(IntervalId) {
                let mapped = outputs
                    .get(&(j, rebuild.view.clone()))
                    .map_or(&[][..], Vec::as_slice);
                pieces.extend(
                    scheduler::pieces_for(&cluster, mapped, *p as usize)
                        .into_iter()
                        .map(|piece| proto::PieceLocation {
                            interval: Some(j.0),
                            ..piece
                        }),
                );
            }
            next_task = next_task.saturating_add(1);
            reduce_of_task.insert(next_task, (rebuild.view.clone(), *p));
            owners.insert(target.id);
            let of = ReduceOf {
                stage: &rebuild.view,
                interval: i.0,
                partition: *p,
                pieces,
                watermark,
            };
            let mode = ReduceMode {
                replay: true,
                keep_changes: rebuild.keep_changes,
                withhold_changes: true,
            };
            // The partition is being rebuilt on its new owner: no copies.
            reduce_tasks.push(StageTask::reduce(
                next_task,
                target.id,
                of,
                mode,
                Vec::new(),
            ));
        }
    }
    let mut stage = run_stage(
        &cluster,
        reduce_tasks,
        "replay reduce tasks",
        None,
        &mut next_task,
    )
    .await;
    let mut kept: KeptChanges = HashMap::new();
    for (id, (worker, result)) in std::mem::take(&mut stage.results) {
        let Some((view, p)) = reduce_of_task.get(&id) else {
            continue;
        };
        if !active.iter().any(|r| r.view == *view && r.keep_changes) {
            continue;
        }
        let block = (result.changed_rows > 0).then(|| BlockInfo {
            interval: i,
            index: *p,
            rows: result.changed_rows,
            bytes: result.changed_bytes,
            holders: vec![worker],
        });
        kept.entry(view.clone()).or_default().push((*p, block));
    }
    lost_tasks(
        &cluster,
        |id| reduce_of_task.get(&id).map(|(view, _)| view),
        stage.lost,
        failed,
    )?;
    if let Some(w) = alive.iter().find(|w| !cluster.is_alive(w.id)) {
        return Err(Interrupted::by(cluster.unavailable(w.id)));
    }

    let owners: Vec<WorkerRecord> = alive
        .iter()
        .filter(|w| owners.contains(&w.id))
        .cloned()
        .collect();
    let commit = CommitOptions {
        checkpoint: false,
        lineage,
    };
    let request = proto::CommitRequest {
        interval: i.0,
        checkpoint: commit.checkpoint,
        keep_from: commit.lineage.map(|l| l.0),
        replay: true,
    };
    let commits = cluster
        .call_each(&owners, "commit a replayed interval", |client| async move {
            client.commit(request).await
        })
        .await;
    for (worker, result) in commits {
        match result {
            Ok(_) => {}
            Err(e) if !cluster.is_alive(worker) => return Err(Interrupted::by(e.to_string())),
            Err(e) => {
                for rebuild in active {
                    if rebuild.partitions.iter().any(|p| p.target.id == worker) {
                        failed.entry(rebuild.view.clone()).or_insert(e.to_string());
                    }
                }
            }
        }
    }
    Ok(kept)
}

/// Fails the views of tasks that got no result, or interrupts the recovery when a
/// worker was lost meanwhile.
fn lost_tasks<'a>(
    cluster: &Cluster,
    view_of: impl Fn(u64) -> Option<&'a String>,
    lost: HashMap<u64, (u64, String)>,
    failed: &mut BTreeMap<String, String>,
) -> std::result::Result<(), Interrupted> {
    for (id, (worker, error)) in lost {
        if !cluster.is_alive(worker) {
            return Err(Interrupted::by(error));
        }
        if let Some(view) = view_of(id) {
            failed.entry(view.clone()).or_insert(error);
        }
    }
    Ok(())
}

/// What a worker needs to load partition `p` of `view` from `checkpoint` (the
/// interval and what it holds of the partition), or to start it empty without one.
pub(crate) fn restore_request(
    view: &str,
    p: u32,
    checkpoint: Option<(IntervalId, Option<&PartitionCheckpoint>)>,
) -> proto::RestorePartitionRequest {
    let held = checkpoint.and_then(|(_, held)| held);
    proto::RestorePartitionRequest {
        view: view.to_string(),
        partition: p,
        checkpoint: checkpoint.map(|(at, _)| at.0),
        files: held
            .map(|h| {
                h.files
                    .iter()
                    .map(|f| proto::CheckpointFile {
                        path: f.path.clone(),
                        bytes: f.bytes,
                        rows: f.rows,
                        part: f.part.clone(),
                    })
                    .collect()
            })
            .unwrap_or_default(),
        emitted_until: held.and_then(|h| h.emitted_until),
        watermark: held.and_then(|h| h.watermark),
    }
}
