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

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use datafusion::catalog::{MemTable, TableProvider};
use datafusion::common::TableReference;
use datafusion::prelude::{SessionConfig, SessionContext};
use dstream_executor::view_runtime::ViewPartition;
use dstream_executor::{Block, Changelog, SourceRuntime, ViewRuntime};
use dstream_planner::Catalog;
use dstream_storage::{CatalogFile, DataDir, IntervalId, Timeline};
use tokio::sync::{Mutex, broadcast, watch};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::clock::IntervalClock;
use crate::config::ServeConfig;
use crate::error::{Error, Result};

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

/// A user table.
#[derive(Clone, Debug)]
pub enum TableSlot {
    /// Rows inserted with `INSERT`, persisted in the data directory.
    Memory(Arc<MemTable>),
    /// Files in a directory.
    File(Arc<dyn TableProvider>),
}

impl TableSlot {
    pub fn provider(&self) -> Arc<dyn TableProvider> {
        match self {
            TableSlot::Memory(m) => m.clone(),
            TableSlot::File(f) => f.clone(),
        }
    }
}

/// A source and, if it stopped, why.
#[derive(Debug)]
pub struct SourceSlot {
    pub runtime: SourceRuntime,
    pub failure: Option<String>,
}

/// A view and, if it stopped, why.
#[derive(Debug)]
pub struct ViewSlot {
    pub runtime: ViewRuntime,
    pub failure: Option<String>,
    pub last_interval: Option<IntervalId>,
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
}

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
    pub history: VecDeque<IntervalStat>,
    pub last_committed: Option<IntervalId>,
    /// Stored definitions that could not be restored at startup, and why.
    pub unrestored: Vec<(dstream_storage::CatalogEntry, String)>,
}

/// The committed state readers see: everything after one interval.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// The last committed interval, if any.
    pub interval: Option<IntervalId>,
    /// Start of that interval, nanoseconds since the epoch.
    pub interval_start: i64,
    /// Rows of each view, by partition.
    pub views: HashMap<String, (SchemaRef, Vec<ViewPartition>)>,
    /// Views that stopped, and why; reading them is an error.
    pub failed: HashMap<String, String>,
    /// The retained recent blocks of each source.
    pub sources: HashMap<String, (SchemaRef, Vec<Arc<Block>>)>,
    pub tables: HashMap<String, Arc<dyn TableProvider>>,
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
    pub data_dir: DataDir,
    pub catalog_file: CatalogFile,
    pub session_config: SessionConfig,
    /// Runs tasks; has no tables, only functions and settings.
    pub task_ctx: SessionContext,
    pub state: Mutex<EngineState>,
    pub snapshot: RwLock<Arc<Snapshot>>,
    /// Number of intervals committed since the engine started.
    pub committed: watch::Sender<u64>,
    pub subscribers: std::sync::Mutex<HashMap<String, broadcast::Sender<Arc<ChangeBatch>>>>,
    /// The interval loop, awaited by [`Engine::stopped`].
    pub interval_loop: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// The DataFusion settings every dstream context uses.
pub fn session_config(partitions: usize) -> SessionConfig {
    let mut config = SessionConfig::new()
        .with_target_partitions(partitions.max(1))
        .with_information_schema(true)
        .with_default_catalog_and_schema("dstream", "public");
    let options = config.options_mut();
    options.sql_parser.dialect = datafusion::config::Dialect::PostgreSQL;
    // TEXT columns are plain Utf8, which every connector and the wire encoding handle.
    options.sql_parser.map_string_types_to_utf8view = false;
    config
}

impl Engine {
    /// Opens the data directory, restores the catalog and starts the interval loop,
    /// which stops when `shutdown` is cancelled.
    pub async fn start(
        config: ServeConfig,
        clock: Arc<dyn IntervalClock>,
        shutdown: CancellationToken,
    ) -> Result<Engine> {
        config.validate()?;
        let data_dir = DataDir::open_local(&config.data_dir)?;
        let catalog_file = CatalogFile::new(data_dir.clone());
        let stored = catalog_file.load().await?;
        let mut batch_interval = config.batch_interval;
        if let Some(v) = stored.settings.get("batch_interval") {
            batch_interval = dstream_planner::duration::parse_duration(v)?;
        }
        // Intervals start at whole multiples of their width (…:07.000, …:08.000 for 1 s),
        // the first one at the next such boundary.
        let width = batch_interval.as_nanos().max(1) as i64;
        let origin = clock.now_nanos().div_euclid(width) * width;
        let origin = if origin == clock.now_nanos() {
            origin
        } else {
            origin + width
        };
        let timeline = Timeline::new(origin, batch_interval);
        let session_config = session_config(config.partitions);
        // Tasks run single-partitioned: parallelism comes from running many tasks.
        let task_ctx = SessionContext::new_with_config(self::session_config(1));
        let (committed, _) = watch::channel(0);
        let engine = Engine {
            inner: Arc::new(Inner {
                config,
                clock,
                data_dir,
                catalog_file,
                session_config,
                task_ctx,
                state: Mutex::new(EngineState {
                    catalog: Catalog::default(),
                    settings: stored.settings.clone(),
                    timeline,
                    next: IntervalId(0),
                    sources: BTreeMap::new(),
                    tables: BTreeMap::new(),
                    views: BTreeMap::new(),
                    history: VecDeque::new(),
                    last_committed: None,
                    unrestored: Vec::new(),
                }),
                snapshot: RwLock::new(Arc::new(Snapshot::default())),
                committed,
                subscribers: std::sync::Mutex::new(HashMap::new()),
                interval_loop: std::sync::Mutex::new(None),
            }),
        };
        engine.restore(&stored.entries).await?;
        let driver = engine.clone();
        #[allow(clippy::disallowed_methods)] // the handle is kept in `interval_loop`
        let handle = tokio::spawn(async move { driver.interval_loop(shutdown).await });
        if let Ok(mut slot) = engine.inner.interval_loop.lock() {
            *slot = Some(handle);
        }
        Ok(engine)
    }

    /// Waits until the interval loop has stopped (after shutdown was requested).
    pub async fn stopped(&self) {
        let handle = match self.inner.interval_loop.lock() {
            Ok(mut slot) => slot.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        if let Some(handle) = handle {
            let _ = handle.await;
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
                objects = entries.len() - unrestored.len(),
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

    /// Subscribes to a view's changes; messages carry their interval.
    pub fn subscribe_changes(&self, view: &str) -> broadcast::Receiver<Arc<ChangeBatch>> {
        let mut subscribers = match self.inner.subscribers.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        subscribers
            .entry(view.to_string())
            .or_insert_with(|| broadcast::channel(1024).0)
            .subscribe()
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
            self.run_next_interval().await;
        }
        info!("interval loop stopped");
    }

    /// Seals the next interval, runs every view over it and commits the result.
    pub async fn run_next_interval(&self) {
        let mut state = self.inner.state.lock().await;
        let interval = state.next;
        let timeline = state.timeline;
        let started = Instant::now();
        let delay_nanos = self.inner.clock.now_nanos() - timeline.end_nanos(interval);
        let scheduling_delay = if self.inner.clock.as_manual().is_some() {
            Duration::ZERO
        } else {
            Duration::from_nanos(delay_nanos.max(0) as u64)
        };

        let mut blocks: HashMap<String, Vec<Arc<Block>>> = HashMap::new();
        let mut input_rows = 0u64;
        for (name, slot) in state.sources.iter_mut() {
            if slot.failure.is_some() {
                continue;
            }
            // Receivers may read files: keep that off the async worker's back.
            let sealed = match tokio::runtime::Handle::current().runtime_flavor() {
                tokio::runtime::RuntimeFlavor::MultiThread => {
                    tokio::task::block_in_place(|| slot.runtime.seal(interval, &timeline))
                }
                _ => slot.runtime.seal(interval, &timeline),
            };
            match sealed {
                Ok(sealed) => {
                    input_rows += sealed.iter().map(|b| b.num_rows() as u64).sum::<u64>();
                    blocks.insert(name.clone(), sealed);
                }
                Err(e) => {
                    warn!(source = %name, error = %e, "source failed and stopped");
                    slot.failure = Some(e.to_string());
                }
            }
        }

        let mut outcomes = Vec::new();
        let watermarks: HashMap<String, Option<i64>> = state
            .sources
            .iter()
            .map(|(n, s)| (n.clone(), s.runtime.watermark()))
            .collect();
        for (name, slot) in state.views.iter() {
            if slot.failure.is_some() {
                continue;
            }
            let plan = slot.runtime.plan();
            let input: Vec<Arc<Block>> = blocks.get(&plan.source).cloned().unwrap_or_default();
            let wm = ViewRuntime::window_watermark(
                plan.window.as_ref(),
                interval,
                &timeline,
                watermarks.get(&plan.source).copied().flatten(),
            );
            match slot
                .runtime
                .run_interval(&self.inner.task_ctx, interval, &input, wm)
                .await
            {
                Ok(outcome) => outcomes.push((name.clone(), Ok(outcome))),
                Err(e) => outcomes.push((name.clone(), Err(e))),
            }
        }

        // Commit: install every view's new version, then publish.
        let mut published = Vec::new();
        for (name, outcome) in outcomes {
            let Some(slot) = state.views.get_mut(&name) else {
                continue;
            };
            match outcome {
                Ok(outcome) => {
                    slot.runtime.commit(&outcome);
                    slot.last_interval = Some(interval);
                    if !outcome.changelog.is_empty() {
                        published.push((
                            name,
                            Arc::new(ChangeBatch {
                                interval,
                                interval_start: timeline.start_nanos(interval),
                                changelog: outcome.changelog,
                                failure: None,
                            }),
                        ));
                    }
                }
                Err(e) => {
                    warn!(view = %name, interval = %interval, error = %e, "materialized view failed and stopped");
                    let failure = format!("interval {interval}: {}", Error::from(e));
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
        let processing_time = started.elapsed();
        state.history.push_back(IntervalStat {
            interval,
            start_nanos: timeline.start_nanos(interval),
            input_rows,
            scheduling_delay,
            processing_time,
        });
        while state.history.len() > HISTORY {
            state.history.pop_front();
        }
        self.publish_snapshot(&state);
        drop(state);
        self.publish_changes(published);
        self.inner.committed.send_modify(|c| *c += 1);
    }

    fn publish_changes(&self, published: Vec<(String, Arc<ChangeBatch>)>) {
        let subscribers = match self.inner.subscribers.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        for (name, batch) in published {
            if let Some(tx) = subscribers.get(&name) {
                // No receivers is fine: nobody is subscribed right now.
                let _ = tx.send(batch);
            }
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
                .map(|(name, slot)| {
                    let plan = slot.runtime.plan();
                    (
                        name.clone(),
                        (plan.schema.clone(), slot.runtime.current().rows.clone()),
                    )
                })
                .collect(),
            failed: state
                .views
                .iter()
                .filter_map(|(name, slot)| slot.failure.clone().map(|f| (name.clone(), f)))
                .collect(),
            sources: state
                .sources
                .iter()
                .map(|(name, slot)| {
                    (
                        name.clone(),
                        (slot.runtime.def().schema.clone(), slot.runtime.retained()),
                    )
                })
                .collect(),
            tables: state
                .tables
                .iter()
                .map(|(name, slot)| (name.clone(), slot.provider()))
                .collect(),
        };
        match self.inner.snapshot.write() {
            Ok(mut s) => *s = Arc::new(snapshot),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(snapshot),
        }
    }

    /// A fresh DataFusion context for one ad-hoc query over `snapshot`: views, the
    /// retained rows of sources, and tables.
    pub fn query_context(&self, snapshot: &Snapshot) -> Result<SessionContext> {
        let ctx = SessionContext::new_with_config(self.inner.session_config.clone());
        for (name, (schema, partitions)) in &snapshot.views {
            let parts: Vec<Vec<RecordBatch>> =
                partitions.iter().map(|p| p.as_ref().clone()).collect();
            ctx.register_table(
                TableReference::bare(name.as_str()),
                Arc::new(MemTable::try_new(schema.clone(), parts)?),
            )?;
        }
        for (name, (schema, blocks)) in &snapshot.sources {
            let rows: Vec<RecordBatch> = blocks.iter().flat_map(|b| b.batches.clone()).collect();
            ctx.register_table(
                TableReference::bare(name.as_str()),
                Arc::new(MemTable::try_new(schema.clone(), vec![rows])?),
            )?;
        }
        for (name, provider) in &snapshot.tables {
            ctx.register_table(TableReference::bare(name.as_str()), provider.clone())?;
        }
        Ok(ctx)
    }

    /// The interval clock.
    pub fn clock(&self) -> &Arc<dyn IntervalClock> {
        &self.inner.clock
    }
}
