//! One stage of an interval's DAG on the workers, with speculative copies of
//! stragglers.
//!
//! [`run_stage`] sends each worker its tasks of the stage in one `RunTasks` call and
//! reads, task by task, when each one starts (gets a task slot) and finishes. With
//! [`Speculation`] on, a task straggles when it has run longer than `multiplier` ×
//! the median run time of the finished tasks of the same view and kind (map or
//! reduce) — once at least [`SPECULATION_QUANTILE`] of those are done, else of all
//! tasks of that kind — and at least `min_runtime`. Workers queue tasks behind their slots, so the tasks queued on a
//! worker with a straggling task straggle too. A straggler gets a copy on another
//! worker that can run it: for a map task another holder of its block, for a reduce
//! task any other live worker, which first fetches the committed state partition
//! from its owner over Flight. The first copy to finish wins. The other is
//! *abandoned*: stopped, and for a reduce task its worker forgets the partition, so
//! a reduce task won by its copy moves the state partition to the copy's worker
//! ([`StageOutcome::results`] says where each task ran). Tasks are deterministic,
//! so which copy wins does not change any result.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dstream_executor::rpc::proto::{self, task::Kind as TaskKind};
use futures::stream::{BoxStream, SelectAll, StreamExt};
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::Cluster;
use super::handover::adopt_request;
use crate::error::{Error, Result};

/// Share of a stage's tasks that must be done before stragglers are looked for.
pub const SPECULATION_QUANTILE: f64 = 0.5;

/// When a running task is a straggler worth a copy.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Speculation {
    /// A task is a straggler once it runs this many times the median of the tasks
    /// done (Spark's `spark.speculation.multiplier`).
    pub multiplier: f64,
    /// ... and at least this long: short stages are left alone.
    pub min_runtime: Duration,
}

impl Default for Speculation {
    fn default() -> Self {
        Speculation {
            multiplier: 1.5,
            min_runtime: Duration::from_millis(100),
        }
    }
}

/// A task of a stage: where it runs first, and where a copy may run.
#[derive(Debug)]
pub(crate) struct StageTask {
    pub worker: u64,
    pub task: proto::Task,
    /// Workers a copy may run on if the task straggles (empty: never copied).
    pub alternatives: Vec<u64>,
}

/// Which partition of which stage a reduce task folds, in which interval, and from
/// what.
#[derive(Debug)]
pub(crate) struct ReduceOf<'a> {
    pub stage: &'a str,
    pub interval: u64,
    pub partition: u32,
    /// The map outputs it reads, in the order every run folds them.
    pub pieces: Vec<proto::PieceLocation>,
    /// The window watermark after the interval, if the stage has a window.
    pub watermark: Option<i64>,
}

/// What a reduce task does with its output besides folding it into its partition.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ReduceMode {
    /// Rebuilding a lost partition: the interval was committed before.
    pub replay: bool,
    /// Keeps the partition's changes on the worker for the stages that read it.
    pub keep_changes: bool,
    /// Sends no changes back to the coordinator: no one subscribes.
    pub withhold_changes: bool,
}

impl StageTask {
    /// Reduce task `id` on `worker`, the same for an interval, a replay and a copy;
    /// a copy may run on `alternatives` (empty: the partition is being rebuilt on its
    /// new owner and is not copied).
    pub fn reduce(
        id: u64,
        worker: u64,
        of: ReduceOf<'_>,
        mode: ReduceMode,
        alternatives: Vec<u64>,
    ) -> Self {
        StageTask {
            worker,
            task: proto::Task {
                id,
                view: of.stage.to_string(),
                interval: of.interval,
                kind: Some(TaskKind::Reduce(proto::ReduceTask {
                    partition: of.partition,
                    pieces: of.pieces,
                    watermark: of.watermark,
                    replay: mode.replay,
                    adopt: None,
                    keep_changes: mode.keep_changes,
                    withhold_changes: mode.withhold_changes,
                })),
            },
            alternatives,
        }
    }
}

/// What a stage did.
#[derive(Debug, Default)]
pub(crate) struct StageOutcome {
    /// By task id: the worker whose copy succeeded first, and its result.
    pub results: HashMap<u64, (u64, proto::TaskResult)>,
    /// By task id, tasks no copy of which succeeded: the worker of the original and
    /// the first error (a task's own error, or its worker's).
    pub lost: HashMap<u64, (u64, String)>,
    /// Of `lost`, the tasks whose worker had said it was running them when they were
    /// lost (not only queued there).
    pub lost_running: BTreeSet<u64>,
    /// Copies started.
    pub speculated: u64,
    /// Tasks whose copy finished first.
    pub copies_won: u64,
    /// Workers a copy outran: stragglers.
    pub outrun: BTreeSet<u64>,
}

/// One copy of a task, sent to a worker.
#[derive(Debug)]
struct Attempt {
    /// The id it was sent with (a copy has its own).
    sent_id: u64,
    worker: u64,
    /// When the worker said it started running (it may queue it first).
    started: Option<Instant>,
    failed: Option<String>,
}

#[derive(Debug)]
struct Running {
    task: StageTask,
    /// Tasks compared with each other: those of one view and kind.
    group: Group,
    attempts: Vec<Attempt>,
    result: Option<(u64, proto::TaskResult)>,
}

/// A view, and whether its map (true) or reduce tasks.
type Group = (String, bool);

impl Running {
    fn is_complete(&self) -> bool {
        self.result.is_some() || self.attempts.iter().all(|a| a.failed.is_some())
    }

    /// When the original attempt started, while it is the only one and running.
    fn running_since(&self) -> Option<Instant> {
        match self.attempts.as_slice() {
            [only] if only.failed.is_none() && self.result.is_none() => only.started,
            _ => None,
        }
    }

    /// A reduce task's (view, partition).
    fn partition(&self) -> Option<(String, u32)> {
        match &self.task.task.kind {
            Some(TaskKind::Reduce(r)) => Some((self.task.task.view.clone(), r.partition)),
            _ => None,
        }
    }
}

/// What a `RunTasks` call reports.
enum CallEvent {
    Result(proto::TaskResult),
    /// The call failed: every task in it that had not answered is lost there.
    Failed(Vec<u64>, String),
}

/// Runs `tasks` (ids unique within their interval), with copies of stragglers when
/// `speculation` is given; copies take ids from `next_id`.
pub(crate) async fn run_stage(
    cluster: &Arc<Cluster>,
    tasks: Vec<StageTask>,
    what: &'static str,
    speculation: Option<Speculation>,
    next_id: &mut u64,
) -> StageOutcome {
    let (_, no_more) = mpsc::unbounded_channel();
    run_fed_stage(cluster, tasks, no_more, what, speculation, next_id).await
}

/// [`run_stage`] of `tasks` and of those that arrive on `more` while it runs (as
/// the workers sealing an interval answer, say); it ends once `more` is closed and
/// every task is done.
pub(crate) async fn run_fed_stage(
    cluster: &Arc<Cluster>,
    tasks: Vec<StageTask>,
    mut more: mpsc::UnboundedReceiver<Vec<StageTask>>,
    what: &'static str,
    speculation: Option<Speculation>,
    next_id: &mut u64,
) -> StageOutcome {
    let mut outcome = StageOutcome::default();
    let mut running: HashMap<u64, Running> = HashMap::new();
    // Sent id -> task id.
    let mut task_of: HashMap<u64, u64> = HashMap::new();
    let mut calls: SelectAll<BoxStream<'static, (u64, CallEvent)>> = SelectAll::new();
    let mut times = RunTimes::default();
    let stage = (&mut running, &mut task_of, &mut times);
    start_tasks(cluster, what, tasks, stage, &mut calls);
    let mut feeding = true;
    // Where copies may go: the workers alive when the stage started.
    let alive: HashSet<u64> = cluster.alive().iter().map(|w| w.id).collect();
    loop {
        let pending = running.values().any(|r| !r.is_complete());
        if !feeding && (!pending || calls.is_empty()) {
            break;
        }
        let due = speculation.and_then(|policy| next_straggler(&alive, &running, &times, policy));
        let timer = async {
            match due {
                Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            batch = more.recv(), if feeding => match batch {
                Some(tasks) => {
                    let stage = (&mut running, &mut task_of, &mut times);
                    start_tasks(cluster, what, tasks, stage, &mut calls);
                }
                None => feeding = false,
            },
            event = calls.next(), if !calls.is_empty() => match event {
                None => continue,
                Some((worker, CallEvent::Result(result))) => {
                    let Some(task) = task_of.get(&result.id).and_then(|id| running.get_mut(id)) else {
                        continue;
                    };
                    if result.started {
                        if let Some(attempt) = task.attempts.iter_mut().find(|a| a.sent_id == result.id) {
                            attempt.started = Some(Instant::now());
                        }
                        continue;
                    }
                    cluster.tasks_done(worker, 1);
                    if task.result.is_some() {
                        continue;
                    }
                    // A task that fails fails in every copy (tasks are deterministic),
                    // but a copy can also fail for its own reasons (say, fetching the
                    // partition from an owner that died): only a success wins.
                    if !result.error.is_empty() {
                        if let Some(attempt) = task.attempts.iter_mut().find(|a| a.sent_id == result.id) {
                            attempt.failed.get_or_insert(result.error);
                        }
                        continue;
                    }
                    if task.attempts.first().is_some_and(|a| a.sent_id != result.id) {
                        outcome.copies_won = outcome.copies_won.saturating_add(1);
                        outcome.outrun.insert(task.task.worker);
                    }
                    times.add(&task.group, Duration::from_micros(result.micros));
                    task.result = Some((worker, result));
                }
                Some((_, CallEvent::Failed(sent_ids, error))) => {
                    for sent in sent_ids {
                        let Some(task) = task_of.get(&sent).and_then(|id| running.get_mut(id)) else {
                            continue;
                        };
                        if let Some(attempt) = task.attempts.iter_mut().find(|a| a.sent_id == sent) {
                            attempt.failed.get_or_insert_with(|| error.clone());
                        }
                    }
                }
            },
            _ = timer => {
                let Some(policy) = speculation else { continue };
                let straggling = stragglers(&alive, &running, &times, policy, Instant::now());
                for copy in plan_copies(&alive, &mut running, &straggling, next_id) {
                    task_of.insert(copy.task.id, copy.of);
                    calls.push(call(cluster.clone(), copy.worker, vec![copy.task], copy.adopt_from, what));
                    outcome.speculated = outcome.speculated.saturating_add(1);
                }
            }
        }
    }
    if running.is_empty() {
        return outcome;
    }
    tracing::debug!(
        what,
        tasks = running.len(),
        copies = outcome.speculated,
        copies_won = outcome.copies_won,
        "stage done"
    );
    abandon_losers(cluster, &running).await;
    drop(calls);

    for (id, task) in running {
        match task.result {
            Some(result) => {
                outcome.results.insert(id, result);
            }
            None => {
                let was_running = task.attempts.first().is_some_and(|a| a.started.is_some());
                let error = task
                    .attempts
                    .into_iter()
                    .find_map(|a| a.failed)
                    .unwrap_or_else(|| "the task got no answer".to_string());
                if was_running {
                    outcome.lost_running.insert(id);
                }
                outcome.lost.insert(id, (task.task.worker, error));
            }
        }
    }
    outcome
}

/// Sends `tasks` to their workers, one `RunTasks` call each, and records them in the
/// stage: by id, by sent id, and counted in their groups.
fn start_tasks(
    cluster: &Arc<Cluster>,
    what: &'static str,
    tasks: Vec<StageTask>,
    (running, task_of, times): (
        &mut HashMap<u64, Running>,
        &mut HashMap<u64, u64>,
        &mut RunTimes,
    ),
    calls: &mut SelectAll<BoxStream<'static, (u64, CallEvent)>>,
) {
    let mut per_worker: BTreeMap<u64, Vec<proto::Task>> = BTreeMap::new();
    for task in tasks {
        let id = task.task.id;
        per_worker
            .entry(task.worker)
            .or_default()
            .push(task.task.clone());
        task_of.insert(id, id);
        let group = (
            task.task.view.clone(),
            matches!(task.task.kind, Some(TaskKind::Map(_))),
        );
        times.count(&group);
        running.insert(
            id,
            Running {
                group,
                attempts: vec![Attempt {
                    sent_id: id,
                    worker: task.worker,
                    started: None,
                    failed: None,
                }],
                task,
                result: None,
            },
        );
    }
    for (worker, tasks) in per_worker {
        calls.push(call(cluster.clone(), worker, tasks, None, what));
    }
}

/// Whether `task` is still running, has no copy yet, and has somewhere else to go.
fn copyable(alive: &HashSet<u64>, task: &Running) -> bool {
    !task.is_complete()
        && task.attempts.len() == 1
        && task
            .task
            .alternatives
            .iter()
            .any(|w| *w != task.task.worker && alive.contains(w))
}

/// Task counts, and run times of finished tasks (sorted), per group and per kind.
#[derive(Debug, Default)]
struct RunTimes {
    tasks: HashMap<Group, usize>,
    done: HashMap<Group, Vec<Duration>>,
    /// The same for the map tasks (true) and the reduce tasks (false) of every view.
    kind_tasks: HashMap<bool, usize>,
    kind_done: HashMap<bool, Vec<Duration>>,
}

impl RunTimes {
    fn count(&mut self, group: &Group) {
        let n = self.tasks.entry(group.clone()).or_default();
        *n = n.saturating_add(1);
        let n = self.kind_tasks.entry(group.1).or_default();
        *n = n.saturating_add(1);
    }

    fn add(&mut self, group: &Group, ran: Duration) {
        let insert = |times: &mut Vec<Duration>| {
            let at = times.partition_point(|t| *t <= ran);
            times.insert(at, ran);
        };
        insert(self.done.entry(group.clone()).or_default());
        insert(self.kind_done.entry(group.1).or_default());
    }

    /// How long a task of `group` may run before it straggles: `multiplier` × the
    /// median run time of the group's finished tasks, at least `min_runtime`. A group
    /// counts once [`SPECULATION_QUANTILE`] of it is done; before that (say, one
    /// worker holds every partition of a view) the tasks of the same kind across all
    /// views stand in for it. `None` while neither counts.
    fn limit(&self, group: &Group, policy: Speculation) -> Option<Duration> {
        let enough = |done: &[Duration], total: usize| {
            !done.is_empty() && done.len() as f64 >= (SPECULATION_QUANTILE * total as f64).ceil()
        };
        let own = self.done.get(group).map(Vec::as_slice).unwrap_or_default();
        let kind = self
            .kind_done
            .get(&group.1)
            .map(Vec::as_slice)
            .unwrap_or_default();
        let reference = if enough(own, self.tasks.get(group).copied().unwrap_or(0)) {
            own
        } else if enough(kind, self.kind_tasks.get(&group.1).copied().unwrap_or(0)) {
            kind
        } else {
            return None;
        };
        let median = *reference.get(reference.len() / 2)?;
        Some(median.mul_f64(policy.multiplier).max(policy.min_runtime))
    }
}

/// When the next running task becomes a straggler, if any can.
fn next_straggler(
    alive: &HashSet<u64>,
    running: &HashMap<u64, Running>,
    times: &RunTimes,
    policy: Speculation,
) -> Option<Instant> {
    running
        .values()
        .filter(|t| copyable(alive, t))
        .filter_map(|t| {
            t.running_since()?
                .checked_add(times.limit(&t.group, policy)?)
        })
        .min()
}

/// The tasks that straggle at `now`: those running past their limit, and every task
/// still queued on the same workers.
fn stragglers(
    alive: &HashSet<u64>,
    running: &HashMap<u64, Running>,
    times: &RunTimes,
    policy: Speculation,
    now: Instant,
) -> Vec<u64> {
    let slow: Vec<(u64, u64)> = running
        .iter()
        .filter(|(_, t)| copyable(alive, t))
        .filter(|(_, t)| {
            t.running_since()
                .zip(times.limit(&t.group, policy))
                .is_some_and(|(since, limit)| since.checked_add(limit).is_some_and(|at| at <= now))
        })
        .map(|(id, t)| (*id, t.task.worker))
        .collect();
    let slow_workers: HashSet<u64> = slow.iter().map(|(_, w)| *w).collect();
    let queued = running.iter().filter(|(_, t)| {
        copyable(alive, t)
            && slow_workers.contains(&t.task.worker)
            && t.attempts.first().is_some_and(|a| a.started.is_none())
    });
    let mut ids: Vec<u64> = slow.iter().map(|(id, _)| *id).collect();
    ids.extend(queued.map(|(id, _)| *id));
    ids
}

/// A speculative copy to start.
#[derive(Debug)]
struct Copy {
    /// The task it copies.
    of: u64,
    worker: u64,
    task: proto::Task,
    /// A reduce copy fetches its partition from this worker (the owner) first.
    adopt_from: Option<u64>,
}

/// Records a copy of each task in `straggling` on the alternative worker with the
/// fewest tasks of the stage still running, with ids from `next_id`.
fn plan_copies(
    alive: &HashSet<u64>,
    running: &mut HashMap<u64, Running>,
    straggling: &[u64],
    next_id: &mut u64,
) -> Vec<Copy> {
    // Attempts still running on each worker: copies go where the fewest are.
    let mut busy: HashMap<u64, usize> = HashMap::new();
    for task in running.values().filter(|t| !t.is_complete()) {
        for a in task.attempts.iter().filter(|a| a.failed.is_none()) {
            let n = busy.entry(a.worker).or_default();
            *n = n.saturating_add(1);
        }
    }
    let mut copies = Vec::new();
    let mut ids = straggling.to_vec();
    ids.sort();
    for id in ids {
        let Some(task) = running.get_mut(&id) else {
            continue;
        };
        let Some(target) = task
            .task
            .alternatives
            .iter()
            .filter(|w| **w != task.task.worker && alive.contains(*w))
            .min_by_key(|w| (busy.get(w).copied().unwrap_or(0), **w))
            .copied()
        else {
            continue;
        };
        *next_id = next_id.saturating_add(1);
        let mut copy = task.task.task.clone();
        copy.id = *next_id;
        info!(
            task = id,
            view = %copy.view,
            interval = copy.interval,
            from = task.task.worker,
            to = target,
            running_for = ?task.running_since().map(|since| since.elapsed()),
            "task straggles; starting a speculative copy"
        );
        task.attempts.push(Attempt {
            sent_id: copy.id,
            worker: target,
            started: None,
            failed: None,
        });
        let n = busy.entry(target).or_default();
        *n = n.saturating_add(1);
        copies.push(Copy {
            of: id,
            worker: target,
            task: copy,
            adopt_from: task.partition().map(|_| task.task.worker),
        });
    }
    copies
}

/// Tells the workers of the copies that lost to stop them; a reduce task's loser
/// also forgets the partition (its winner's worker holds it now).
async fn abandon_losers(cluster: &Arc<Cluster>, running: &HashMap<u64, Running>) {
    let mut requests: BTreeMap<u64, proto::AbandonRequest> = BTreeMap::new();
    for task in running.values().filter(|t| t.attempts.len() > 1) {
        let winner = task.result.as_ref().map(|(w, r)| (*w, r.id));
        for attempt in &task.attempts {
            if winner == Some((attempt.worker, attempt.sent_id)) {
                continue;
            }
            let request = requests
                .entry(attempt.worker)
                .or_insert_with(|| proto::AbandonRequest {
                    interval: task.task.task.interval,
                    ..Default::default()
                });
            request.tasks.push(attempt.sent_id);
            // With no winner the partition stays where it was.
            if let (Some(_), Some((view, partition))) = (winner, task.partition()) {
                request
                    .drop
                    .push(proto::DescribePartitionRequest { view, partition });
            }
        }
    }
    let abandons = requests.into_iter().map(|(worker, request)| async move {
        let Some(w) = cluster.get(worker).filter(|w| w.is_reachable()) else {
            return;
        };
        if let Err(e) = cluster
            .call(worker, "abandon tasks", w.client.abandon(request))
            .await
        {
            warn!(worker, error = %e, "could not abandon the losing copies of tasks");
        }
    });
    futures::future::join_all(abandons).await;
}

/// One `RunTasks` call, as a stream of its results; a worker lost meanwhile ends it
/// with a failure. With `adopt_from`, the (single, reduce) task is a speculative copy
/// that first fetches its state partition from that worker, so it is described there
/// first.
fn call(
    cluster: Arc<Cluster>,
    worker: u64,
    tasks: Vec<proto::Task>,
    adopt_from: Option<u64>,
    what: &'static str,
) -> BoxStream<'static, (u64, CallEvent)> {
    enum State {
        Start(Vec<proto::Task>),
        Reading(Box<tonic::Streaming<proto::TaskResult>>, Vec<u64>),
        Done,
    }
    futures::stream::unfold(State::Start(tasks), move |state| {
        let cluster = cluster.clone();
        async move {
            let (mut results, sent) = match state {
                State::Done => return None,
                State::Reading(results, sent) => (results, sent),
                State::Start(tasks) => {
                    let sent: Vec<u64> = tasks.iter().map(|t| t.id).collect();
                    match start(&cluster, worker, tasks, adopt_from, what).await {
                        Ok(results) => (Box::new(results), sent),
                        Err(e) => {
                            return Some((
                                (worker, CallEvent::Failed(sent, e.to_string())),
                                State::Done,
                            ));
                        }
                    }
                }
            };
            let next = cluster.call(worker, what, results.message()).await;
            match next {
                Ok(Some(result)) => Some((
                    (worker, CallEvent::Result(result)),
                    State::Reading(results, sent),
                )),
                Ok(None) => None,
                Err(e) => Some((
                    (worker, CallEvent::Failed(sent, e.to_string())),
                    State::Done,
                )),
            }
        }
    })
    .boxed()
}

async fn start(
    cluster: &Cluster,
    worker: u64,
    mut tasks: Vec<proto::Task>,
    adopt_from: Option<u64>,
    what: &'static str,
) -> Result<tonic::Streaming<proto::TaskResult>> {
    if let Some(owner) = adopt_from.and_then(|id| cluster.get(id)) {
        for task in &mut tasks {
            if let Some(TaskKind::Reduce(reduce)) = &mut task.kind {
                reduce.adopt =
                    Some(adopt_request(cluster, &owner, &task.view, reduce.partition).await?);
            }
        }
    }
    let w = cluster
        .get(worker)
        .ok_or_else(|| Error::WorkerLost(cluster.unavailable(worker)))?;
    let results = cluster
        .call(
            worker,
            what,
            w.client.run_tasks(proto::RunTasksRequest { tasks }),
        )
        .await?;
    Ok(results)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(view: &str, map: bool) -> Group {
        (view.to_string(), map)
    }

    const POLICY: Speculation = Speculation {
        multiplier: 1.5,
        min_runtime: Duration::from_millis(100),
    };

    #[test]
    fn a_view_is_its_own_reference_once_half_its_tasks_are_done() {
        let mut times = RunTimes::default();
        let (a, b) = (group("a", false), group("b", false));
        for _ in 0..4 {
            times.count(&a);
            times.count(&b);
        }
        assert_eq!(times.limit(&a, POLICY), None, "nothing done yet");
        times.add(&a, Duration::from_millis(400));
        assert_eq!(times.limit(&a, POLICY), None, "1 of 4 is not half");
        times.add(&a, Duration::from_millis(200));
        // Median of [200, 400] (the upper one) × 1.5.
        assert_eq!(times.limit(&a, POLICY), Some(Duration::from_millis(600)));
        // View b has nothing done; reduce tasks of every view stand in once half of
        // them are done: 2 of 8 is not.
        assert_eq!(times.limit(&b, POLICY), None);
        times.add(&a, Duration::from_millis(300));
        times.add(&a, Duration::from_millis(10));
        // [10, 200, 300, 400]: median 300 × 1.5.
        assert_eq!(times.limit(&b, POLICY), Some(Duration::from_millis(450)));
        // Map tasks are another kind: nothing done among them.
        assert_eq!(times.limit(&group("b", true), POLICY), None);
    }

    #[test]
    fn short_tasks_straggle_only_after_the_minimum() {
        let mut times = RunTimes::default();
        let a = group("a", true);
        times.count(&a);
        times.count(&a);
        times.add(&a, Duration::from_millis(2));
        assert_eq!(times.limit(&a, POLICY), Some(Duration::from_millis(100)));
    }
}
