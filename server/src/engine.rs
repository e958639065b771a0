//! The coordinator: the interval clock loop, the live sources and views, and the
//! committed snapshot that readers see.
//!
//! [`Engine`] owns everything. At every tick of its [`IntervalClock`] it seals the
//! interval of every source into a block, runs every view's stage DAG over the blocks,
//! and then commits: it swaps in a new [`Snapshot`] — the state of all views after the
//! interval — and publishes each view's changelog to its subscribers. A reader takes
//! one snapshot and therefore sees exactly one completed interval.
//!
//! Statements are executed by [`crate::session`]; this module holds the state they act
//! on.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use arrow::datatypes::SchemaRef;
use datafusion::catalog::TableProvider;
use datafusion::common::TableReference;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::prelude::{SessionConfig, SessionContext};
use dstream_executor::Changelog;
use dstream_executor::rpc::proto;
use dstream_executor::worker::compute::{ComputePool, Work};
use dstream_planner::Catalog;
use dstream_storage::checkpoint::SourceCheckpoint;
use dstream_storage::{CatalogFile, DataDir, IntervalId, Timeline};
use tokio::net::TcpListener;
use tokio::sync::{Mutex, broadcast, watch};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::changes::ChangeFeeds;
use crate::clock::IntervalClock;
use crate::cluster::checkpoint::{self, CheckpointedView, Checkpoints, Pending};
use crate::cluster::handover;
use crate::cluster::local::{Launch, LocalWorkers, Supervision};
use crate::cluster::recovery::{self, RecoveryStat};
use crate::cluster::remote_table::{RemoteSource, RemoteView};
use crate::cluster::resume;
use crate::cluster::scheduler::{self, CommitOptions, Interrupted, StageCounts, ViewOutcome};
use crate::cluster::{Cluster, CoordinatorService};
use crate::config::ServeConfig;
use crate::error::{Error, Result};
use crate::state::{BlockInfo, EngineState, Inbox, Placement};
use crate::status::ObjectStatus;
use crate::system_tables;

/// How long `dstream serve` waits for its local workers to join.
const WORKERS_JOIN: Duration = Duration::from_secs(30);

/// How long stopping waits for a checkpoint being written.
const CHECKPOINT_ON_STOP: Duration = Duration::from_secs(10);

/// How many times an interval is tried when lost workers interrupt it.
const INTERVAL_ATTEMPTS: u32 = 4;

/// In how many attempts of one interval a view's tasks may be running on a worker
/// that dies before the view is stopped as the likely cause.
const POISON_ATTEMPTS: u32 = 2;

/// How many intervals of history `dstream_intervals` keeps.
const HISTORY: usize = 1000;

/// One view's changes in one interval, as sent to subscribers.
#[derive(Debug)]
pub struct ChangeBatch {
    pub interval: IntervalId,
    /// Start of the interval, nanoseconds since the epoch.
    pub interval_start: i64,
    pub changelog: Changelog,
    /// Set when the view failed in this interval: the last message its subscribers get.
    pub failure: Option<String>,
}

/// Timing of one interval, as the Spark Streaming UI shows it.
#[derive(Clone, Copy, Debug)]
pub struct IntervalStat {
    pub interval: IntervalId,
    pub start_nanos: i64,
    pub input_rows: u64,
    /// How late processing started after the interval ended (real clock only).
    pub scheduling_delay: Duration,
    pub processing_time: Duration,
    pub map_tasks: u64,
    /// Of `map_tasks`, those started ahead, while the interval before ran.
    pub map_tasks_ahead: u64,
    pub reduce_tasks: u64,
    pub shuffle_bytes: u64,
    pub workers: u64,
    /// Speculative copies of straggling tasks started.
    pub speculative_tasks: u64,
}

/// A view as a snapshot shows it: where its partitions are.
#[derive(Clone, Debug)]
pub struct SnapshotView {
    pub schema: SchemaRef,
    pub placement: Placement,
}

/// The committed state readers see: everything after one interval.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// The last committed interval, if any.
    pub interval: Option<IntervalId>,
    /// Start of that interval, nanoseconds since the epoch.
    pub interval_start: i64,
    pub views: HashMap<String, SnapshotView>,
    /// Views that stopped, and why; reading them is an error.
    pub failed: HashMap<String, String>,
    /// The retained recent blocks of each source.
    pub sources: HashMap<String, (SchemaRef, Vec<BlockInfo>)>,
    pub tables: HashMap<String, Arc<dyn TableProvider>>,
    /// What the sources, tables and views report.
    pub status: ObjectStatus,
    /// The width of an interval, in nanoseconds.
    pub interval_nanos: i64,
    /// The inbox of each pushed (`http`) source.
    pub inboxes: HashMap<String, Arc<Inbox>>,
}

/// The dstream engine; cheap to clone.
#[derive(Clone)]
pub struct Engine {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("data_dir", &self.inner.data_dir)
            .field("clock", &self.inner.clock)
            .finish_non_exhaustive()
    }
}

pub(crate) struct Inner {
    pub config: ServeConfig,
    pub clock: Arc<dyn IntervalClock>,
    /// The object store: catalog, table data and checkpoints.
    pub data_dir: DataDir,
    pub catalog_file: CatalogFile,
    pub checkpoints: Arc<std::sync::Mutex<Checkpoints>>,
    pub session_config: SessionConfig,
    pub cluster: Arc<Cluster>,
    pub local_workers: Mutex<LocalWorkers>,
    /// What the local workers' supervisors report.
    pub supervision: Supervision,
    pub state: Mutex<EngineState>,
    pub snapshot: RwLock<Arc<Snapshot>>,
    /// Number of intervals committed since the engine started.
    pub committed: watch::Sender<u64>,
    /// The changes of views with subscribers.
    pub changes: ChangeFeeds,
    /// Recent intervals, oldest first, for `dstream_intervals`.
    pub history: std::sync::Mutex<VecDeque<IntervalStat>>,
    /// Recoveries from lost workers, oldest first, for `dstream_recoveries`.
    pub recoveries: std::sync::Mutex<VecDeque<RecoveryStat>>,
    pub grpc_stop: CancellationToken,
    pub coordinator_url: String,
    /// Where the HTTP API listens, once it does.
    pub http_addr: std::sync::OnceLock<std::net::SocketAddr>,
    /// The gRPC service and the liveness monitor, awaited by [`Engine::stopped`].
    pub background: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// The interval loop, awaited by [`Engine::stopped`].
    pub interval_loop: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Threads with deep stacks that parse statements and run definitions, `SHOW`
    /// and `ADVANCE` (see [`crate::session`]), whatever runtime the front door runs on.
    pub statements: ComputePool,
    /// Threads with deep stacks that run ad-hoc queries: a busy query never holds up
    /// a definition or `ADVANCE`.
    pub queries: ComputePool,
}

pub use dstream_executor::task::session_config;

impl Engine {
    /// Opens the data directory, restores the catalog, serves the coordinator's gRPC
    /// service on `grpc`, starts the configured local workers and waits for them to
    /// join, then starts the interval loop. Everything stops when `shutdown` is
    /// cancelled; [`Engine::stopped`] waits for it.
    pub async fn start(
        config: ServeConfig,
        clock: Arc<dyn IntervalClock>,
        grpc: TcpListener,
        shutdown: CancellationToken,
    ) -> Result<Engine> {
        config.validate()?;
        let data_dir = DataDir::open(&config.store_config())?;
        let catalog_file = CatalogFile::new(data_dir.clone());
        let stored = catalog_file.load().await?;
        let mut batch_interval = config.batch_interval;
        if let Some(v) = stored.settings.get("batch_interval") {
            batch_interval = dstream_planner::duration::parse_duration(v)?;
        }
        // Intervals start at whole multiples of their width (…:07.000, …:08.000 for 1 s),
        // the first one at the next such boundary.
        let width = batch_interval.as_nanos().max(1) as i64;
        let origin = clock.now_nanos().div_euclid(width).saturating_mul(width);
        let origin = if origin == clock.now_nanos() {
            origin
        } else {
            origin.saturating_add(width)
        };
        // A store with a committed checkpoint: carry on after it, on its timeline
        // (unless checkpoints are off: then every start is a fresh one).
        let checkpointing = config.checkpoint_intervals > 0 || config.checkpoint_every.is_some();
        let manifest = match checkpointing {
            true => resume::latest(&data_dir, batch_interval).await?,
            false => None,
        };
        let (timeline, next) = match &manifest {
            Some(m) => (
                Timeline {
                    origin_nanos: m.origin_nanos,
                    width_nanos: m.width_nanos,
                },
                IntervalId(m.interval).next(),
            ),
            None => (Timeline::new(origin, batch_interval), IntervalId(0)),
        };
        let session_config = session_config(config.partitions);
        let (committed, _) = watch::channel(0);
        let cluster = Arc::new(Cluster::default());
        let grpc_addr = grpc.local_addr()?;
        let grpc_stop = CancellationToken::new();
        let service = dstream_executor::rpc::proto::coordinator_server::CoordinatorServer::new(
            CoordinatorService::new(cluster.clone()),
        );
        let server = tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming_shutdown(
                dstream_executor::worker::tokio_stream_listener(grpc),
                grpc_stop.clone().cancelled_owned(),
            );
        #[allow(clippy::disallowed_methods)] // kept in `background`, awaited by `stopped`
        let grpc_task = tokio::spawn(async move {
            if let Err(e) = server.await {
                error!(error = %e, "the coordinator's gRPC service stopped");
            }
        });
        let monitor_cluster = cluster.clone();
        let monitor_stop = shutdown.clone();
        #[allow(clippy::disallowed_methods)] // kept in `background`, awaited by `stopped`
        let monitor = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = monitor_stop.cancelled() => break,
                    _ = tokio::time::sleep(crate::cluster::HEARTBEAT) => monitor_cluster.check_liveness(),
                }
            }
        });
        info!(address = %grpc_addr, "coordinator listening for workers");
        let coordinator_url = format!("http://{grpc_addr}");
        let local_workers = LocalWorkers::start(
            config.workers,
            Launch {
                mode: config.worker_mode.clone(),
                cores: config.worker_cores(),
                coordinator: coordinator_url.clone(),
                s3: config.s3.clone(),
            },
            config.worker_restarts,
            cluster.clone(),
            &shutdown,
        )
        .await?;
        let supervision = local_workers.supervision();
        let expected = config.workers;
        let statements = ComputePool::new(Work::Statements, 2)?;
        let queries = ComputePool::new(
            Work::Queries,
            std::thread::available_parallelism().map_or(2, |n| n.get().max(2)),
        )?;
        let engine = Engine {
            inner: Arc::new(Inner {
                statements,
                queries,
                config,
                clock,
                data_dir,
                catalog_file,
                checkpoints: Arc::new(std::sync::Mutex::new(Checkpoints::default())),
                session_config,
                cluster,
                local_workers: Mutex::new(local_workers),
                supervision,
                history: std::sync::Mutex::new(VecDeque::new()),
                recoveries: std::sync::Mutex::new(VecDeque::new()),
                grpc_stop,
                coordinator_url,
                http_addr: std::sync::OnceLock::new(),
                background: std::sync::Mutex::new(vec![grpc_task, monitor]),
                state: Mutex::new(EngineState {
                    catalog: Catalog::default(),
                    settings: stored.settings.clone(),
                    timeline,
                    next,
                    sources: BTreeMap::new(),
                    tables: BTreeMap::new(),
                    views: BTreeMap::new(),
                    last_committed: None,
                    catalog_version: 0,
                    unrestored: Vec::new(),
                    sealing: None,
                    sealed_ahead: None,
                    mapped_ahead: None,
                    next_task_range: scheduler::FIRST_RANGED_TASK,
                    balanced_for: None,
                    outrun: BTreeMap::new(),
                    resume: None,
                }),
                snapshot: RwLock::new(Arc::new(Snapshot::default())),
                committed,
                changes: ChangeFeeds::default(),
                interval_loop: std::sync::Mutex::new(None),
            }),
        };
        if expected > 0 {
            if let Err(e) = engine
                .inner
                .cluster
                .wait_for_workers(expected, WORKERS_JOIN)
                .await
            {
                shutdown.cancel();
                engine.stop_cluster().await;
                return Err(Error::Config(format!(
                    "the local workers did not start: {e}"
                )));
            }
            info!(workers = expected, "local workers joined");
        }
        engine.restore(&stored.entries).await?;
        {
            let mut state = engine.inner.state.lock().await;
            match manifest {
                // Partitions are loaded on workers: without any yet (`dstream
                // coordinator`), once the first one joins (see `run_next_interval`).
                Some(manifest) if engine.inner.cluster.alive().is_empty() => {
                    info!(
                        checkpoint = manifest.interval,
                        "will resume from the latest checkpoint once a worker joins"
                    );
                    state.resume = Some(Arc::new(manifest));
                }
                Some(manifest) => resume::resume(&engine, &mut state, Arc::new(manifest)).await,
                None => {
                    // A fresh timeline: where objects started on the old one means
                    // nothing now, here or in the stored catalog.
                    let stale = state.sources.values().any(|s| s.since.is_some())
                        || state.views.values().any(|v| v.since.is_some());
                    state.sources.values_mut().for_each(|s| s.since = None);
                    state.views.values_mut().for_each(|v| v.since = None);
                    if stale
                        && let Err(e) = crate::session::persist_catalog(
                            &engine,
                            &state,
                            &state.catalog,
                            &state.settings,
                        )
                        .await
                    {
                        warn!(error = %e, "could not store the catalog after starting a new timeline");
                    }
                    engine
                        .checkpoints()
                        .start_counting(None, engine.inner.clock.now_nanos());
                }
            }
        }
        engine.start_handovers(shutdown.clone());
        let driver = engine.clone();
        #[allow(clippy::disallowed_methods)] // the handle is kept in `interval_loop`
        let handle = tokio::spawn(async move { driver.interval_loop(shutdown).await });
        if let Ok(mut slot) = engine.inner.interval_loop.lock() {
            *slot = Some(handle);
        }
        Ok(engine)
    }

    /// The coordinator's gRPC address, e.g. `http://127.0.0.1:6876`.
    pub fn coordinator_url(&self) -> &str {
        &self.inner.coordinator_url
    }

    /// Where the HTTP API listens, if it does.
    pub fn http_addr(&self) -> Option<std::net::SocketAddr> {
        self.inner.http_addr.get().copied()
    }

    /// Records where the HTTP API listens (once).
    pub fn set_http_addr(&self, addr: std::net::SocketAddr) {
        let _ = self.inner.http_addr.set(addr);
    }

    /// The worker registry.
    pub fn cluster(&self) -> &Arc<Cluster> {
        &self.inner.cluster
    }

    /// Process ids of the worker processes this server started.
    pub async fn local_worker_pids(&self) -> Vec<u32> {
        self.inner.supervision.pids()
    }

    /// Waits until the interval loop has stopped (after shutdown was requested), then
    /// stops the local workers and the coordinator's gRPC service.
    pub async fn stopped(&self) {
        let handle = match self.inner.interval_loop.lock() {
            Ok(mut slot) => slot.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        if let Some(handle) = handle {
            let _ = handle.await;
        }
        self.stop_cluster().await;
    }

    /// Checkpoint progress.
    pub(crate) fn checkpoints(&self) -> std::sync::MutexGuard<'_, Checkpoints> {
        match self.inner.checkpoints.lock() {
            Ok(c) => c,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    async fn stop_cluster(&self) {
        // A checkpoint being written gets a moment to commit while workers still serve.
        let writing = self.checkpoints().take_writing();
        if let Some(mut writing) = writing
            && tokio::time::timeout(CHECKPOINT_ON_STOP, &mut writing)
                .await
                .is_err()
        {
            warn!("stopping before the checkpoint being written committed");
            writing.abort();
        }
        // Workers stopping with the coordinator just leave.
        self.inner.cluster.set_handovers(false);
        self.inner.local_workers.lock().await.stop().await;
        self.inner.grpc_stop.cancel();
        let background: Vec<_> = match self.inner.background.lock() {
            Ok(mut b) => b.drain(..).collect(),
            Err(poisoned) => poisoned.into_inner().drain(..).collect(),
        };
        for task in background {
            let _ = task.await;
        }
    }

    /// Replays the stored definitions.
    /// Replays the stored definitions. One that cannot be restored (say, a file
    /// table whose directory is gone) is logged and kept aside — still in the catalog
    /// file, droppable by name — so that the server starts and nothing is lost.
    async fn restore(&self, entries: &[dstream_storage::CatalogEntry]) -> Result<()> {
        let mut unrestored = Vec::new();
        for entry in entries {
            if let Err(e) = crate::session::restore_entry(self, entry).await {
                error!(
                    name = %entry.name,
                    statement = %entry.sql,
                    error = %e,
                    "cannot restore this definition; it is kept in the catalog and can be dropped"
                );
                unrestored.push((entry.clone(), e.to_string()));
            }
        }
        if !entries.is_empty() {
            info!(
                objects = entries.len().saturating_sub(unrestored.len()),
                unrestored = unrestored.len(),
                "restored the catalog"
            );
        }
        self.inner.state.lock().await.unrestored = unrestored;
        Ok(())
    }

    /// The server configuration.
    pub fn config(&self) -> &ServeConfig {
        &self.inner.config
    }

    /// The committed snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        match self.inner.snapshot.read() {
            Ok(s) => s.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Number of intervals committed since the engine started.
    pub fn committed_intervals(&self) -> u64 {
        *self.inner.committed.borrow()
    }

    /// Waits until at least `count` intervals have been committed.
    pub async fn wait_committed(&self, count: u64) -> Result<()> {
        let mut rx = self.inner.committed.subscribe();
        loop {
            let waited =
                tokio::time::timeout(Duration::from_millis(200), rx.wait_for(|c| *c >= count))
                    .await;
            match waited {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(_)) => break,
                // Still waiting: make sure the loop that commits intervals is alive.
                Err(_) if self.interval_loop_running() => continue,
                Err(_) => break,
            }
        }
        Err(Error::Internal("the interval loop stopped".into()))
    }

    fn interval_loop_running(&self) -> bool {
        match self.inner.interval_loop.lock() {
            Ok(slot) => slot.as_ref().is_some_and(|h| !h.is_finished()),
            Err(_) => false,
        }
    }

    /// Subscribes to a view's changes; messages carry their interval. Call it between
    /// intervals, with `next` the interval to run next.
    pub fn subscribe_changes(
        &self,
        view: &str,
        next: IntervalId,
    ) -> broadcast::Receiver<Arc<ChangeBatch>> {
        self.inner.changes.subscribe(view, next)
    }

    /// Whether `view` has subscribers right now.
    pub fn has_subscribers(&self, view: &str) -> bool {
        self.inner.changes.has_subscribers(view)
    }

    /// Whether `view`'s reduce tasks send its changes back to the coordinator in the
    /// interval about to run (changes stay on the workers otherwise): while it has
    /// subscribers, and for a while after, so that they can resume.
    pub fn wants_changes(&self, view: &str) -> bool {
        self.inner.changes.wanted(view)
    }

    /// The changes of `view` after interval `after`, if they are all still kept.
    pub fn changes_since(&self, view: &str, after: IntervalId) -> Option<Vec<Arc<ChangeBatch>>> {
        self.inner.changes.since(view, after)
    }

    /// Hands a leaving worker's work over as soon as it asks to leave (the interval
    /// loop also does so before each interval), until `shutdown`.
    fn start_handovers(&self, shutdown: CancellationToken) {
        let cluster = self.inner.cluster.clone();
        cluster.set_handovers(true);
        let mut changes = cluster.membership_changes();
        let engine = self.clone();
        #[allow(clippy::disallowed_methods)] // kept in `background`, awaited by `stopped`
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    changed = changes.changed() => if changed.is_err() { break },
                }
                if cluster.leaving().is_empty() {
                    continue;
                }
                let mut state = engine.inner.state.lock().await;
                handover::hand_over_leaving(&engine, &mut state).await;
            }
        });
        match self.inner.background.lock() {
            Ok(mut b) => b.push(task),
            Err(poisoned) => poisoned.into_inner().push(task),
        }
    }

    async fn interval_loop(&self, shutdown: CancellationToken) {
        loop {
            let end = {
                let state = self.inner.state.lock().await;
                state.timeline.end_nanos(state.next)
            };
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = self.inner.clock.wait_until(end) => {}
            }
            if shutdown.is_cancelled() {
                break;
            }
            tokio::select! {
                _ = self.run_next_interval() => {}
                _ = shutdown.cancelled() => {
                    // Stopping mid-interval: the interval is not committed; the
                    // workers drop its running tasks and outputs.
                    let interval = self.inner.state.lock().await.next;
                    self.cancel_interval(interval).await;
                    break;
                }
            }
        }
        info!("interval loop stopped");
    }

    /// Cancels `interval` (in progress, uncommitted) on every reachable worker: its
    /// running tasks stop and its outputs are dropped.
    async fn cancel_interval(&self, interval: IntervalId) {
        let cluster = self.inner.cluster.clone();
        let cancels = cluster
            .workers()
            .into_iter()
            .filter(|w| w.is_reachable())
            .map(|w| {
                let cluster = cluster.clone();
                async move {
                    let request = proto::CancelRequest {
                        interval: interval.0,
                    };
                    let answer = tokio::time::timeout(
                        Duration::from_secs(2),
                        cluster.call(w.id, "cancel the interval", w.client.cancel(request)),
                    )
                    .await;
                    match answer {
                        Ok(Ok(r)) => info!(worker = w.id, interval = %interval, dropped = r.cancelled, "cancelled the interval in progress"),
                        Ok(Err(e)) => warn!(worker = w.id, error = %e, "could not cancel the interval in progress"),
                        Err(_) => warn!(worker = w.id, "cancelling the interval in progress timed out"),
                    }
                }
            });
        futures::future::join_all(cancels).await;
    }

    /// Seals the next interval, runs every view over it on the workers and commits
    /// the result.
    pub async fn run_next_interval(&self) {
        let mut state = self.inner.state.lock().await;
        let interval = state.next;
        let timeline = state.timeline;
        let started = Instant::now();
        let delay_nanos = self
            .inner
            .clock
            .now_nanos()
            .saturating_sub(timeline.end_nanos(interval));
        let scheduling_delay = if self.inner.clock.as_manual().is_some() {
            Duration::ZERO
        } else {
            Duration::from_nanos(delay_nanos.max(0) as u64)
        };
        // Leaving workers hand their work over; late-joining workers get the catalog;
        // new objects get placed.
        handover::hand_over_leaving(self, &mut state).await;
        if let Err(e) = scheduler::sync_workers(self, &mut state).await {
            warn!(error = %e, "could not install the catalog on every worker");
        }
        if !self.inner.cluster.alive().is_empty()
            && let Some(manifest) = state.resume.take()
        {
            resume::resume(self, &mut state, manifest).await;
        }
        let membership = self.inner.cluster.membership_version();
        if state.balanced_for != Some(membership) && handover::rebalance(self, &mut state).await {
            state.balanced_for = Some(membership);
        }
        let config = &self.inner.config;
        let now = self.inner.clock.now_nanos();
        let commit = {
            let checkpoints = self.checkpoints();
            CommitOptions {
                checkpoint: checkpoints.due(
                    interval,
                    now,
                    config.checkpoint_intervals,
                    config.checkpoint_every,
                ),
                lineage: self.lineage(&state, checkpoints.committed()),
            }
        };
        // Behind the clock, the next interval is sealed while this one runs.
        let seal_next = self
            .inner
            .clock
            .has_ended(timeline.end_nanos(interval.next()));
        // Work of lost workers is recovered first; a worker lost during the interval
        // interrupts it, and it runs again once that worker's work is recovered.
        let mut attempts: u32 = 0;
        // Views stopped in this interval because their tasks were on every worker
        // lost while it ran, and how many attempts each view's tasks were on one.
        let mut poisonous: BTreeMap<String, String> = BTreeMap::new();
        let mut suspected: BTreeMap<String, u32> = BTreeMap::new();
        let (mut outcomes, counts) = loop {
            if let Some(stat) = recovery::recover(self, &mut state, commit.lineage).await {
                self.record_recovery(stat);
            }
            match scheduler::run_interval(self, &mut state, interval, commit, seal_next).await {
                Ok(done) => break done,
                Err(Interrupted { reason, suspects }) => {
                    attempts = attempts.saturating_add(1);
                    self.cancel_interval(interval).await;
                    for view in suspects {
                        let times = suspected.entry(view.clone()).or_default();
                        *times = times.saturating_add(1);
                        if *times >= POISON_ATTEMPTS
                            && let Some(slot) = state.views.get_mut(&view)
                        {
                            let why = format!(
                                "stopped after its tasks were running on a worker that died \
                                 in {times} attempts of this interval (last: {reason}); \
                                 the view may be what kills them, so it is not run again"
                            );
                            error!(view = %view, %interval, %why, "stopping a materialized view");
                            // Not run again in this interval's attempts; the commit
                            // below records it as failed and tells its subscribers.
                            slot.failure = Some(why.clone());
                            poisonous.insert(view, why);
                        }
                    }
                    if !poisonous.is_empty() {
                        // The interval runs again without them: other views go on.
                        attempts = attempts.min(INTERVAL_ATTEMPTS - 1);
                    }
                    if attempts >= INTERVAL_ATTEMPTS {
                        error!(%interval, attempts, %reason, "interval interrupted by lost workers too often; stopping its views");
                        let reason =
                            format!("interrupted {attempts} times by lost workers, last: {reason}");
                        let outcomes = state
                            .views
                            .iter()
                            .filter(|(_, v)| v.failure.is_none() && v.placement.is_placed())
                            .map(|(name, _)| (name.clone(), ViewOutcome::Failed(reason.clone())))
                            .collect();
                        break (outcomes, StageCounts::default());
                    }
                    warn!(%interval, attempt = attempts, %reason, "interval interrupted by a lost worker; recovering, then running it again");
                }
            }
        };
        for (view, why) in poisonous {
            outcomes.insert(view, ViewOutcome::Failed(why));
        }
        state.sealing = None;
        let input_rows: u64 = state
            .sources
            .values()
            .filter_map(|s| s.retained.back())
            .filter(|s| s.interval == interval)
            .flat_map(|s| s.blocks.iter().map(|b| b.rows))
            .sum();

        // A stage that failed stops its view's other stages and the views that read
        // it.
        let failures: Vec<(String, String)> = outcomes
            .iter()
            .filter_map(|(name, o)| match o {
                ViewOutcome::Failed(reason) => Some((name.clone(), reason.clone())),
                ViewOutcome::Done { .. } => None,
            })
            .collect();
        for (failed, reason) in failures {
            for name in state.failing_with(&failed) {
                let reason = format!("{failed} failed: {reason}");
                match outcomes.get(&name) {
                    Some(ViewOutcome::Failed(_)) => {}
                    _ => {
                        outcomes.insert(name, ViewOutcome::Failed(reason));
                    }
                }
            }
        }
        // Commit: record every view's new version, then publish.
        let mut published = Vec::new();
        for (name, outcome) in outcomes {
            let Some(slot) = state.views.get_mut(&name) else {
                continue;
            };
            match outcome {
                ViewOutcome::Done {
                    changelog,
                    partition_rows,
                    stats,
                } => {
                    slot.first_interval.get_or_insert(interval);
                    slot.last_interval = Some(interval);
                    slot.partition_rows = partition_rows;
                    slot.stats = stats;
                    if !changelog.is_empty() {
                        published.push((
                            name,
                            Arc::new(ChangeBatch {
                                interval,
                                interval_start: timeline.start_nanos(interval),
                                changelog,
                                failure: None,
                            }),
                        ));
                    }
                }
                ViewOutcome::Failed(reason) => {
                    warn!(view = %name, interval = %interval, error = %reason, "materialized view failed and stopped");
                    let failure = format!("interval {interval}: {reason}");
                    slot.failure = Some(failure.clone());
                    published.push((
                        name,
                        Arc::new(ChangeBatch {
                            interval,
                            interval_start: timeline.start_nanos(interval),
                            changelog: Changelog::default(),
                            failure: Some(failure),
                        }),
                    ));
                }
            }
        }
        state.next = interval.next();
        state.last_committed = Some(interval);
        if commit.checkpoint {
            self.start_checkpoint(&state, interval, now);
        }
        let processing_time = started.elapsed();
        let mut history = match self.inner.history.lock() {
            Ok(h) => h,
            Err(poisoned) => poisoned.into_inner(),
        };
        let stat = IntervalStat {
            interval,
            start_nanos: timeline.start_nanos(interval),
            input_rows,
            scheduling_delay,
            processing_time,
            map_tasks: counts.map_tasks,
            map_tasks_ahead: counts.map_tasks_ahead,
            reduce_tasks: counts.reduce_tasks,
            shuffle_bytes: counts.shuffle_bytes,
            workers: counts.workers,
            speculative_tasks: counts.speculative_tasks,
        };
        crate::metrics::interval(&stat, &state);
        history.push_back(stat);
        while history.len() > HISTORY {
            history.pop_front();
        }
        drop(history);
        self.publish_snapshot(&state);
        drop(state);
        self.publish_changes(published);
        self.inner
            .committed
            .send_modify(|c| *c = c.saturating_add(1));
    }

    /// The first interval recovery may replay, whose input commits keep: the one
    /// after the latest committed checkpoint, or before there is one, the first
    /// interval of any running view. `None` when checkpoints are off.
    fn lineage(&self, state: &EngineState, checkpointed: Option<IntervalId>) -> Option<IntervalId> {
        let config = &self.inner.config;
        if config.checkpoint_intervals == 0 && config.checkpoint_every.is_none() {
            return None;
        }
        Some(match checkpointed {
            Some(c) => c.next(),
            None => state
                .views
                .values()
                .filter(|v| v.failure.is_none())
                .filter_map(|v| v.first_interval)
                .min()
                .unwrap_or(state.next),
        })
    }

    fn record_recovery(&self, stat: RecoveryStat) {
        crate::metrics::recovery(&stat);
        let mut recoveries = match self.inner.recoveries.lock() {
            Ok(r) => r,
            Err(poisoned) => poisoned.into_inner(),
        };
        recoveries.push_back(stat);
        while recoveries.len() > HISTORY {
            recoveries.pop_front();
        }
    }

    /// Starts committing the checkpoint the workers took at the commit of `interval`:
    /// every view that is running, every source's position.
    fn start_checkpoint(&self, state: &EngineState, interval: IntervalId, now: i64) {
        let views = state
            .views
            .iter()
            .filter(|(_, v)| v.failure.is_none() && v.placement.is_placed())
            .filter_map(|(name, v)| {
                let sql = state.stage_sql(name)?;
                Some(CheckpointedView {
                    name: name.clone(),
                    sql,
                    placement: v.placement.clone(),
                })
            })
            .collect();
        let sources = state
            .sources
            .iter()
            .filter(|(_, s)| s.failure.is_none())
            .map(|(name, s)| {
                (
                    name.clone(),
                    SourceCheckpoint {
                        sql: state
                            .catalog
                            .get(name)
                            .map(|o| o.sql().to_string())
                            .unwrap_or_default(),
                        records: s.stats.receiver.records,
                        malformed: s.stats.receiver.malformed,
                        late_rows: s.stats.late_rows,
                        watermark: s.stats.watermark,
                        seen_files: s
                            .positions
                            .iter()
                            .flat_map(|p| p.seen_files.iter().cloned())
                            .collect(),
                    },
                )
            })
            .collect();
        let pending = Pending {
            interval,
            timeline: state.timeline,
            views,
            sources,
            workers: self.inner.cluster.alive(),
            keep: self.inner.config.checkpoints_kept,
        };
        #[allow(clippy::disallowed_methods)] // kept in `checkpoints`, awaited by `stopped`
        let writing = tokio::spawn(checkpoint::write(
            self.inner.cluster.clone(),
            self.inner.data_dir.clone(),
            self.inner.checkpoints.clone(),
            pending,
        ));
        self.checkpoints().started(interval, now, writing);
    }

    fn publish_changes(&self, published: Vec<(String, Arc<ChangeBatch>)>) {
        for (name, batch) in published {
            self.inner.changes.publish(&name, batch);
        }
    }

    /// Makes the current state visible to readers, atomically.
    pub(crate) fn publish_snapshot(&self, state: &EngineState) {
        let snapshot = Snapshot {
            interval: state.last_committed,
            interval_start: state
                .last_committed
                .map(|i| state.timeline.start_nanos(i))
                .unwrap_or(0),
            views: state
                .views
                .iter()
                .filter(|(_, slot)| !slot.is_inner_stage())
                .map(|(name, slot)| {
                    (
                        name.clone(),
                        SnapshotView {
                            schema: slot.plan.schema.clone(),
                            // A view with no interval yet has no rows anywhere.
                            placement: if slot.last_interval.is_some() {
                                slot.placement.clone()
                            } else {
                                Placement::default()
                            },
                        },
                    )
                })
                .collect(),
            failed: state
                .views
                .iter()
                .filter(|(_, slot)| !slot.is_inner_stage())
                .filter_map(|(name, slot)| slot.failure.clone().map(|f| (name.clone(), f)))
                .collect(),
            sources: state
                .sources
                .iter()
                .map(|(name, slot)| {
                    (
                        name.clone(),
                        (slot.def.schema.clone(), slot.recent_blocks()),
                    )
                })
                .collect(),
            tables: state
                .tables
                .iter()
                .map(|(name, slot)| (name.clone(), slot.provider()))
                .collect(),
            status: ObjectStatus::of(state),
            interval_nanos: state.timeline.width_nanos,
            inboxes: state
                .sources
                .iter()
                .filter_map(|(name, slot)| Some((name.clone(), slot.inbox.clone()?)))
                .collect(),
        };
        match self.inner.snapshot.write() {
            Ok(mut s) => *s = Arc::new(snapshot),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(snapshot),
        }
    }

    /// A fresh DataFusion context for one ad-hoc query over `snapshot`: views and the
    /// retained rows of sources (read from the workers over Flight when scanned), and
    /// tables.
    pub fn query_context(&self, snapshot: &Snapshot) -> Result<SessionContext> {
        // Each query has its own memory pool of `query_memory`: a query over the limit
        // fails (SQLSTATE 53200) instead of taking memory from the engine.
        let runtime = RuntimeEnvBuilder::new()
            .with_memory_limit(self.inner.config.query_memory, 1.0)
            .build_arc()?;
        let ctx = SessionContext::new_with_config_rt(self.inner.session_config.clone(), runtime);
        let interval = snapshot.interval.unwrap_or(IntervalId(0));
        for (name, view) in &snapshot.views {
            ctx.register_table(
                TableReference::bare(name.as_str()),
                Arc::new(RemoteView {
                    cluster: self.inner.cluster.clone(),
                    name: name.clone(),
                    schema: view.schema.clone(),
                    placement: view.placement.clone(),
                    interval,
                }),
            )?;
        }
        for (name, (schema, blocks)) in &snapshot.sources {
            ctx.register_table(
                TableReference::bare(name.as_str()),
                Arc::new(RemoteSource {
                    cluster: self.inner.cluster.clone(),
                    name: name.clone(),
                    schema: schema.clone(),
                    blocks: blocks.clone(),
                }),
            )?;
        }
        for (name, provider) in &snapshot.tables {
            ctx.register_table(TableReference::bare(name.as_str()), provider.clone())?;
        }
        let history = self.interval_history();
        ctx.register_table(
            TableReference::bare(system_tables::INTERVALS),
            Arc::new(system_tables::intervals_table(&history)?),
        )?;
        let checkpoints = self.checkpoints().history();
        ctx.register_table(
            TableReference::bare(system_tables::CHECKPOINTS),
            Arc::new(system_tables::checkpoints_table(&checkpoints)?),
        )?;
        let recoveries = self.recovery_history();
        ctx.register_table(
            TableReference::bare(system_tables::RECOVERIES),
            Arc::new(system_tables::recoveries_table(&recoveries)?),
        )?;
        ctx.register_table(
            TableReference::bare(system_tables::WORKERS),
            Arc::new(self.workers_table()),
        )?;
        Ok(ctx)
    }

    /// Recent intervals, oldest first.
    pub fn interval_history(&self) -> Vec<IntervalStat> {
        match self.inner.history.lock() {
            Ok(h) => h.iter().copied().collect(),
            Err(poisoned) => poisoned.into_inner().iter().copied().collect(),
        }
    }

    /// Recent checkpoints, oldest first.
    pub fn checkpoint_history(&self) -> Vec<checkpoint::CheckpointStat> {
        self.checkpoints().history()
    }

    /// Recoveries from lost workers, oldest first.
    pub fn recovery_history(&self) -> Vec<RecoveryStat> {
        match self.inner.recoveries.lock() {
            Ok(r) => r.iter().cloned().collect(),
            Err(poisoned) => poisoned.into_inner().iter().cloned().collect(),
        }
    }

    /// `dstream_workers`: every worker that joined, with its own status.
    pub fn workers_table(&self) -> system_tables::WorkersTable {
        system_tables::WorkersTable {
            cluster: self.inner.cluster.clone(),
            supervision: self.inner.supervision.clone(),
        }
    }

    /// The interval clock.
    pub fn clock(&self) -> &Arc<dyn IntervalClock> {
        &self.inner.clock
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Sealing, SplitPosition};

    fn sealed(source: &str, split: u32, records: u64, files: &[&str]) -> proto::SealedSource {
        proto::SealedSource {
            source: source.to_string(),
            split,
            records,
            watermark: Some(records as i64),
            new_files: files.iter().map(|f| f.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn a_receiver_sealed_ahead_stands_after_that_seal() {
        let mut ahead = Sealing::new(IntervalId(7), &BTreeMap::new());
        for s in [sealed("a", 0, 30, &["f2"]), sealed("b", 1, 5, &[])] {
            ahead.splits.insert((s.source.clone(), s.split), s);
        }
        let before = SplitPosition {
            records: 20,
            watermark: Some(20),
            seen_files: ["f1".to_string()].into(),
            ..Default::default()
        };
        let after = ahead.position_after("a", 0, before.clone());
        assert_eq!(after.records, 30);
        assert_eq!(after.watermark, Some(30));
        assert_eq!(
            after.seen_files.iter().collect::<Vec<_>>(),
            vec!["f1", "f2"]
        );
        // A split that did not seal ahead stands where it stood.
        assert_eq!(ahead.position_after("a", 1, before.clone()), before);
        // Moving past the same seal twice (a recovery after an interrupted attempt)
        // changes nothing.
        assert_eq!(ahead.position_after("a", 0, after.clone()), after);
        // After the interval in progress and then the one sealed ahead: where
        // recovery reopens a receiver whose worker was lost in between.
        let mut next = Sealing::new(IntervalId(8), &BTreeMap::new());
        let s = sealed("a", 0, 45, &["f3"]);
        next.splits.insert((s.source.clone(), s.split), s);
        let both = Sealing::position_after_each([&ahead, &next], "a", 0, before.clone());
        assert_eq!(both.records, 45);
        assert_eq!(both.seen_files.len(), 3);
        // A dropped source's seals are forgotten; others stay.
        ahead.forget("a");
        assert_eq!(ahead.position_after("a", 0, before.clone()), before);
        assert_eq!(ahead.position_after("b", 1, before).records, 5);
    }
}
