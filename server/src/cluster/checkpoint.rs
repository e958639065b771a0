//! Checkpoints, the coordinator's side.
//!
//! Every `checkpoint_intervals` intervals, and at least every `checkpoint_every`
//! (measured on the interval clock), the commit of an interval asks every worker to
//! checkpoint: each takes its state partitions as that commit left them and writes
//! them to the object store in the background while the stream goes on. A task here
//! ([`write`]) waits for every worker's part, checks that every partition of every
//! view was written, and commits the checkpoint by writing its manifest with
//! create-if-absent (`dstream_storage::checkpoint`). Only then does the checkpoint
//! count: the next commits tell the workers, which may then drop the input blocks
//! before it (lineage truncation), and checkpoints beyond `checkpoints_kept` are
//! deleted. One checkpoint is written at a time; a checkpoint that fails is logged,
//! shown in `dstream_checkpoints`, and the next one is tried at the next due interval.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dstream_executor::rpc::proto;
use dstream_storage::checkpoint::{
    self, CheckpointFile, Manifest, PartitionCheckpoint, SourceCheckpoint, ViewCheckpoint,
};
use dstream_storage::{DataDir, IntervalId, Timeline};
use tracing::{info, warn};

use super::{Cluster, WorkerRecord};
use crate::error::{Error, Result};
use crate::state::Placement;

/// How many checkpoints `dstream_checkpoints` remembers.
const HISTORY: usize = 100;

/// One checkpoint, as `dstream_checkpoints` shows it.
#[derive(Clone, Debug)]
pub struct CheckpointStat {
    pub interval: IntervalId,
    /// When it was asked for (wall clock, nanoseconds since the epoch).
    pub started_at_nanos: i64,
    /// From the commit that took the state to the manifest (or the failure).
    pub duration: Duration,
    pub views: u64,
    pub partitions: u64,
    pub files: u64,
    pub bytes: u64,
    /// Why it did not commit, if it did not.
    pub error: Option<String>,
}

/// Checkpoint progress of one engine.
#[derive(Debug, Default)]
pub struct Checkpoints {
    /// The interval after which counting starts (`None`: before the first one), and
    /// the clock time then: the last checkpoint started, or the engine's start.
    since: (Option<IntervalId>, i64),
    /// The newest committed checkpoint.
    committed: Option<IntervalId>,
    /// Its manifest, which recovery loads lost partitions from.
    latest: Option<Arc<Manifest>>,
    /// The newest checkpoint started, while it has not committed (being written, or
    /// failed): recovery loads lost partitions whose writing finished from it.
    unfinished: Option<IntervalId>,
    /// Take a checkpoint at the next commit, whatever the count (after a recovery,
    /// whose replayed input is held by fewer workers than before).
    soon: bool,
    writing: Option<tokio::task::JoinHandle<()>>,
    history: VecDeque<CheckpointStat>,
}

impl Checkpoints {
    /// Counts intervals and time from `interval` (exclusive) at clock time `now`.
    pub fn start_counting(&mut self, interval: Option<IntervalId>, now_nanos: i64) {
        self.since = (interval, now_nanos);
    }

    /// Starts from a checkpoint committed before this coordinator started (it
    /// resumed from it): the latest, and counting from it.
    pub fn resumed(&mut self, manifest: Arc<Manifest>, now_nanos: i64) {
        let interval = IntervalId(manifest.interval);
        self.committed = Some(interval);
        self.latest = Some(manifest);
        self.since = (Some(interval), now_nanos);
    }

    /// The newest committed checkpoint.
    pub fn committed(&self) -> Option<IntervalId> {
        self.committed
    }

    /// The manifest of the newest committed checkpoint.
    pub fn latest(&self) -> Option<Arc<Manifest>> {
        self.latest.clone()
    }

    /// The newest checkpoint started that has not committed, if it is newer than the
    /// newest committed one.
    pub fn unfinished(&self) -> Option<IntervalId> {
        self.unfinished
            .filter(|at| self.committed.is_none_or(|c| c < *at))
    }

    /// Asks for a checkpoint at the next commit.
    pub fn request(&mut self) {
        self.soon = true;
    }

    /// Recent checkpoints, oldest first.
    pub fn history(&self) -> Vec<CheckpointStat> {
        self.history.iter().cloned().collect()
    }

    /// Whether committing `interval` at clock time `now` should take a checkpoint:
    /// enough intervals or enough time since the last one, and none being written.
    pub fn due(
        &self,
        interval: IntervalId,
        now_nanos: i64,
        every_intervals: u64,
        every: Option<Duration>,
    ) -> bool {
        if self.writing.as_ref().is_some_and(|h| !h.is_finished()) {
            return false;
        }
        let (since, since_nanos) = self.since;
        let intervals = interval
            .0
            .saturating_add(1)
            .saturating_sub(since.map_or(0, |s| s.0.saturating_add(1)));
        let by_count = every_intervals > 0 && intervals >= every_intervals;
        let by_time = every
            .is_some_and(|every| now_nanos.saturating_sub(since_nanos) >= every.as_nanos() as i64);
        let enabled = every_intervals > 0 || every.is_some();
        by_count || by_time || (self.soon && enabled)
    }

    /// Records that a checkpoint of `interval` is being written by `writing`.
    pub fn started(
        &mut self,
        interval: IntervalId,
        now_nanos: i64,
        writing: tokio::task::JoinHandle<()>,
    ) {
        self.since = (Some(interval), now_nanos);
        self.soon = false;
        self.writing = Some(writing);
        self.unfinished = Some(interval);
    }

    fn finished(&mut self, stat: CheckpointStat, manifest: Option<Manifest>) {
        if let Some(manifest) = manifest
            && self.committed.is_none_or(|c| c < stat.interval)
        {
            self.committed = Some(stat.interval);
            self.latest = Some(Arc::new(manifest));
        }
        self.history.push_back(stat);
        while self.history.len() > HISTORY {
            self.history.pop_front();
        }
    }

    /// The checkpoint being written, to be awaited on shutdown.
    pub fn take_writing(&mut self) -> Option<tokio::task::JoinHandle<()>> {
        self.writing.take()
    }
}

/// A view as the checkpoint of one interval covers it.
#[derive(Clone, Debug)]
pub struct CheckpointedView {
    pub name: String,
    pub sql: String,
    /// The worker of each partition.
    pub placement: Placement,
}

/// Everything a checkpoint needs from the interval it was taken at.
#[derive(Clone, Debug)]
pub struct Pending {
    pub interval: IntervalId,
    pub timeline: Timeline,
    pub views: Vec<CheckpointedView>,
    pub sources: BTreeMap<String, SourceCheckpoint>,
    /// The workers that were asked to checkpoint (every live one).
    pub workers: Vec<WorkerRecord>,
    pub keep: usize,
}

/// Waits for every worker's part of `pending`, commits the manifest, and deletes
/// checkpoints beyond the number kept. The outcome goes to `checkpoints`.
pub async fn write(
    cluster: Arc<Cluster>,
    store: DataDir,
    checkpoints: Arc<std::sync::Mutex<Checkpoints>>,
    pending: Pending,
) {
    let started = Instant::now();
    let started_at_nanos = chrono::Utc::now().timestamp_nanos_opt().unwrap_or(0);
    let interval = pending.interval;
    let result = commit(&cluster, &store, &pending).await;
    let mut stat = CheckpointStat {
        interval,
        started_at_nanos,
        duration: started.elapsed(),
        views: pending.views.len() as u64,
        partitions: 0,
        files: 0,
        bytes: 0,
        error: None,
    };
    match &result {
        Ok(manifest) => {
            stat.partitions = manifest
                .views
                .values()
                .map(|v| v.partitions.len() as u64)
                .sum();
            stat.files = manifest.files().count() as u64;
            stat.bytes = manifest.bytes();
            info!(
                %interval,
                views = stat.views,
                partitions = stat.partitions,
                bytes = stat.bytes,
                elapsed = ?stat.duration,
                "checkpoint committed"
            );
        }
        Err(e) => {
            warn!(%interval, error = %e, "checkpoint failed; the previous one stays the latest, and the next is tried when due");
            stat.error = Some(e.to_string());
        }
    }
    crate::metrics::checkpoint(&stat);
    let committed = result.is_ok();
    let manifest = result.ok();
    match checkpoints.lock() {
        Ok(mut c) => c.finished(stat, manifest),
        Err(poisoned) => poisoned.into_inner().finished(stat, manifest),
    }
    if committed {
        match checkpoint::collect_garbage(&store, pending.keep).await {
            Ok(deleted) if !deleted.is_empty() => {
                info!(deleted = ?deleted.iter().map(|i| i.0).collect::<Vec<_>>(), "deleted old checkpoints")
            }
            Ok(_) => {}
            Err(e) => {
                warn!(error = %e, "could not delete old checkpoints; will try again after the next one")
            }
        }
    }
}

async fn commit(cluster: &Arc<Cluster>, store: &DataDir, pending: &Pending) -> Result<Manifest> {
    let interval = pending.interval;
    let request = proto::AwaitCheckpointRequest {
        interval: interval.0,
    };
    let answers = cluster
        .call_each(
            &pending.workers,
            "write a checkpoint",
            |client| async move { client.await_checkpoint(request).await },
        )
        .await;
    let mut written: HashMap<(u64, String, u32), proto::PartitionCheckpoint> = HashMap::new();
    for (worker, answer) in answers {
        let answer = answer.map_err(|e| {
            Error::Internal(format!("worker {worker} did not write its partitions: {e}"))
        })?;
        for p in answer.partitions {
            written.insert((worker, p.view.clone(), p.partition), p);
        }
    }
    let mut views = BTreeMap::new();
    for view in &pending.views {
        let mut partitions = Vec::with_capacity(view.placement.len());
        for (p, owner) in view.placement.iter() {
            let part = written
                .remove(&(owner, view.name.clone(), p))
                .ok_or_else(|| {
                    Error::Internal(format!(
                        "partition {p} of view {} was not written by worker {owner}",
                        view.name
                    ))
                })?;
            partitions.push(partition_checkpoint(part)?);
        }
        views.insert(
            view.name.clone(),
            ViewCheckpoint {
                sql: view.sql.clone(),
                partitions,
            },
        );
    }
    let manifest = Manifest {
        version: checkpoint::FORMAT_VERSION,
        interval: interval.0,
        origin_nanos: pending.timeline.origin_nanos,
        width_nanos: pending.timeline.width_nanos,
        created_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        views,
        sources: pending.sources.clone(),
    };
    if !manifest.commit(store).await? {
        // Committed before, by an earlier run of this interval: that one stands.
        info!(%interval, "a checkpoint of this interval was already committed");
    }
    Ok(manifest)
}

fn partition_checkpoint(p: proto::PartitionCheckpoint) -> Result<PartitionCheckpoint> {
    let files = p
        .files
        .into_iter()
        .map(|f| CheckpointFile {
            path: f.path,
            part: f.part,
            bytes: f.bytes,
            rows: f.rows,
        })
        .collect();
    Ok(PartitionCheckpoint {
        partition: p.partition,
        files,
        emitted_until: p.emitted_until,
        watermark: p.watermark,
        view_rows: p.view_rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stat(interval: u64, error: Option<&str>) -> CheckpointStat {
        CheckpointStat {
            interval: IntervalId(interval),
            started_at_nanos: 0,
            duration: Duration::ZERO,
            views: 0,
            partitions: 0,
            files: 0,
            bytes: 0,
            error: error.map(str::to_string),
        }
    }

    fn manifest(interval: u64) -> Manifest {
        Manifest {
            version: checkpoint::FORMAT_VERSION,
            interval,
            origin_nanos: 0,
            width_nanos: 1,
            created_at: String::new(),
            views: BTreeMap::new(),
            sources: BTreeMap::new(),
        }
    }

    #[tokio::test]
    #[allow(clippy::disallowed_methods)] // the handles are kept in `c`
    async fn a_checkpoint_is_unfinished_until_it_or_a_newer_one_commits() {
        let mut c = Checkpoints::default();
        assert_eq!(c.unfinished(), None);
        c.started(IntervalId(2), 0, tokio::spawn(async {}));
        assert_eq!(c.unfinished(), Some(IntervalId(2)));
        c.finished(stat(2, None), Some(manifest(2)));
        assert_eq!(c.unfinished(), None);
        // One that fails (a worker died while writing it) stays unfinished: its
        // partitions that were written still count for recovery.
        c.started(IntervalId(5), 0, tokio::spawn(async {}));
        c.finished(stat(5, Some("worker 1 did not write its partitions")), None);
        assert_eq!(c.unfinished(), Some(IntervalId(5)));
        assert_eq!(c.committed(), Some(IntervalId(2)));
        c.started(IntervalId(8), 0, tokio::spawn(async {}));
        c.finished(stat(8, None), Some(manifest(8)));
        assert_eq!(c.unfinished(), None);
    }

    #[test]
    fn checkpoints_fall_due_by_count_or_by_time() {
        let second = 1_000_000_000;
        let mut c = Checkpoints::default();
        c.start_counting(None, 0);
        // Intervals 0..=9 are ten intervals.
        assert!(!c.due(IntervalId(8), 0, 10, None));
        assert!(c.due(IntervalId(9), 0, 10, None));
        // By time only.
        assert!(!c.due(IntervalId(2), 9 * second, 0, Some(Duration::from_secs(10))));
        assert!(c.due(IntervalId(2), 10 * second, 0, Some(Duration::from_secs(10))));
        // Neither configured: never.
        assert!(!c.due(IntervalId(1000), 1000 * second, 0, None));
        // Counting restarts at the last checkpoint started.
        c.start_counting(Some(IntervalId(9)), 10 * second);
        assert!(!c.due(
            IntervalId(18),
            11 * second,
            10,
            Some(Duration::from_secs(10))
        ));
        assert!(c.due(
            IntervalId(19),
            11 * second,
            10,
            Some(Duration::from_secs(10))
        ));
        assert!(c.due(
            IntervalId(12),
            20 * second,
            10,
            Some(Duration::from_secs(10))
        ));
    }
}
