//! The coordinator's view of its workers: membership, liveness and the calls it makes.
//!
//! [`Cluster`] is the registry of workers. Workers join through the `Coordinator` gRPC
//! service ([`CoordinatorService`]), heartbeat every [`HEARTBEAT`], and leave; a worker
//! that misses heartbeats for [`DEAD_AFTER`] (or whose connection fails) is declared
//! dead, logged, and shown as such in `dstream_workers`. A worker that leaves cleanly
//! is *leaving* until the engine has handed its receivers and state partitions over
//! to the other workers ([`handover`]), then *left*. Every call the coordinator
//! makes to a worker goes through [`Cluster::call`], which gives up as soon as that
//! worker is declared dead, so an interval never hangs on a lost worker.
//!
//! # Layout
//! - [`scheduler`]: one interval across the workers: seal, map, shuffle, reduce, commit.
//! - [`stage`]: the tasks of one stage on the workers, with speculative copies of
//!   stragglers.
//! - [`handover`]: moving a leaving worker's receivers and state partitions.
//! - [`checkpoint`]: when to checkpoint, and committing a checkpoint's manifest.
//! - [`recovery`]: rebuilding a dead worker's receivers and state partitions on the
//!   workers that survive.
//! - [`resume`]: carrying on from the latest checkpoint after a restart.
//! - [`remote_table`]: ad-hoc reads of view partitions and input blocks over Flight.
//! - [`local`]: the worker processes `dstream serve` starts, or in-process workers.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use dstream_executor::rpc::FlightPeers;
use dstream_executor::rpc::{WorkerClient, proto};
use tokio::sync::watch;
use tonic::{Request, Response, Status};
use tracing::{error, info, warn};

use crate::error::{Error, Result};

pub mod checkpoint;
pub mod handover;
pub mod local;
pub mod recovery;
pub mod remote_table;
pub mod resume;
pub mod scheduler;
pub mod stage;

/// How often workers heartbeat.
pub const HEARTBEAT: Duration = Duration::from_millis(500);
/// A worker silent for this long is declared dead.
pub const DEAD_AFTER: Duration = Duration::from_secs(3);
/// How long asking a worker whether it is still there may take.
pub const PROBE_WAIT: Duration = Duration::from_secs(2);
/// How long a leaving worker's `Leave` call waits for its handover.
pub const HANDOVER_WAIT: Duration = Duration::from_secs(50);

/// Where a worker is in its life.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WorkerStatus {
    Alive,
    /// Asked to leave; gets no new work, and is still reachable while its work is
    /// handed over.
    Leaving,
    /// Left cleanly.
    Left,
    /// Stopped answering; the reason, as logged.
    Dead(String),
}

impl std::fmt::Display for WorkerStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WorkerStatus::Alive => write!(f, "alive"),
            WorkerStatus::Leaving => write!(f, "leaving"),
            WorkerStatus::Left => write!(f, "left"),
            WorkerStatus::Dead(reason) => write!(f, "dead: {reason}"),
        }
    }
}

/// One worker as the coordinator knows it.
#[derive(Clone, Debug)]
pub struct WorkerRecord {
    pub id: u64,
    pub address: String,
    pub pid: u32,
    pub client: WorkerClient,
    pub status: WorkerStatus,
    pub joined: Instant,
    pub last_seen: Instant,
    pub running_tasks: u32,
    /// Tasks the worker has completed.
    pub tasks_done: u64,
    /// The catalog version installed on the worker.
    pub installed: u64,
    /// Set when the worker left and its work was handed over.
    pub handed_over: bool,
}

impl WorkerRecord {
    /// Alive: gets new work.
    pub fn is_alive(&self) -> bool {
        self.status == WorkerStatus::Alive
    }

    /// Alive or leaving: answers calls and serves its data.
    pub fn is_reachable(&self) -> bool {
        matches!(self.status, WorkerStatus::Alive | WorkerStatus::Leaving)
    }

    /// "worker 2 (http://127.0.0.1:7001)", for messages.
    pub fn describe(&self) -> String {
        format!("worker {} ({})", self.id, self.address)
    }
}

/// The registry of workers.
#[derive(Debug)]
pub struct Cluster {
    workers: Mutex<BTreeMap<u64, WorkerRecord>>,
    next_id: AtomicU64,
    /// Bumped whenever a worker joins, leaves or dies.
    membership: watch::Sender<u64>,
    /// Whether a leaving worker's work is handed over (false once the coordinator
    /// stops: leaving workers then just leave).
    handovers: AtomicBool,
    pub peers: FlightPeers,
}

impl Default for Cluster {
    fn default() -> Self {
        Cluster {
            workers: Mutex::new(BTreeMap::new()),
            next_id: AtomicU64::new(1),
            membership: watch::channel(0).0,
            handovers: AtomicBool::new(false),
            peers: FlightPeers::default(),
        }
    }
}

impl Cluster {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<u64, WorkerRecord>> {
        match self.workers.lock() {
            Ok(w) => w,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    fn bump(&self) {
        self.membership.send_modify(|v| *v = v.saturating_add(1));
    }

    /// Adds a worker; returns its id.
    pub fn register(&self, address: String, pid: u32) -> Result<u64> {
        let client = WorkerClient::connect_lazy(&address)?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        info!(worker = id, %address, pid, "worker joined");
        self.lock().insert(
            id,
            WorkerRecord {
                id,
                address,
                pid,
                client,
                status: WorkerStatus::Alive,
                joined: now,
                last_seen: now,
                running_tasks: 0,
                tasks_done: 0,
                installed: 0,
                handed_over: false,
            },
        );
        self.bump();
        Ok(id)
    }

    /// Records a heartbeat; false if the worker is unknown or no longer reachable.
    pub fn heartbeat(&self, id: u64, running_tasks: u32) -> bool {
        match self.lock().get_mut(&id) {
            Some(w) if w.is_reachable() => {
                w.last_seen = Instant::now();
                w.running_tasks = running_tasks;
                true
            }
            _ => false,
        }
    }

    /// A worker asks to leave: it is leaving until its work is handed over, or left
    /// at once when handovers are off.
    pub fn leave(&self, id: u64) {
        let handovers = self.handovers.load(Ordering::SeqCst);
        if let Some(w) = self.lock().get_mut(&id)
            && w.is_alive()
        {
            if handovers {
                info!(worker = id, address = %w.address, "worker is leaving; handing its work over");
                w.status = WorkerStatus::Leaving;
            } else {
                info!(worker = id, address = %w.address, "worker left");
                w.status = WorkerStatus::Left;
            }
        }
        self.bump();
    }

    /// A leaving worker is gone; `handed_over` says whether its work moved.
    pub fn set_left(&self, id: u64, handed_over: bool) {
        if let Some(w) = self.lock().get_mut(&id)
            && w.status == WorkerStatus::Leaving
        {
            info!(worker = id, address = %w.address, handed_over, "worker left");
            w.status = WorkerStatus::Left;
            w.handed_over = handed_over;
        }
        self.bump();
    }

    /// Workers waiting for their handover.
    pub fn leaving(&self) -> Vec<WorkerRecord> {
        self.lock()
            .values()
            .filter(|w| w.status == WorkerStatus::Leaving)
            .cloned()
            .collect()
    }

    /// Turns handovers on (the engine is running) or off (it stops; workers leaving
    /// now, or still waiting, leave without one).
    pub fn set_handovers(&self, on: bool) {
        self.handovers.store(on, Ordering::SeqCst);
        if !on {
            for w in self.leaving() {
                self.set_left(w.id, false);
            }
        }
    }

    /// Counts joins, leaves and deaths: changes whenever the membership does.
    pub fn membership_version(&self) -> u64 {
        *self.membership.borrow()
    }

    /// Notified whenever a worker joins, leaves or dies.
    pub fn membership_changes(&self) -> watch::Receiver<u64> {
        self.membership.subscribe()
    }

    /// Waits until worker `id` is no longer leaving, at most `timeout`; returns
    /// whether its work was handed over.
    pub async fn wait_left(&self, id: u64, timeout: Duration) -> bool {
        let mut rx = self.membership.subscribe();
        let _ = tokio::time::timeout(timeout, async {
            while self
                .get(id)
                .is_some_and(|w| w.status == WorkerStatus::Leaving)
            {
                if rx.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
        self.get(id).is_some_and(|w| w.handed_over)
    }

    /// Declares a worker dead, once, with the reason.
    pub fn mark_dead(&self, id: u64, reason: &str) {
        let mut workers = self.lock();
        if let Some(w) = workers.get_mut(&id)
            && w.is_reachable()
        {
            error!(worker = id, address = %w.address, reason, "worker is dead");
            w.status = WorkerStatus::Dead(reason.to_string());
            drop(workers);
            self.bump();
        }
    }

    /// Declares dead every worker whose last heartbeat is older than [`DEAD_AFTER`].
    pub fn check_liveness(&self) {
        let silent: Vec<(u64, Duration)> = self
            .lock()
            .values()
            .filter(|w| w.is_reachable() && w.last_seen.elapsed() > DEAD_AFTER)
            .map(|w| (w.id, w.last_seen.elapsed()))
            .collect();
        for (id, silence) in silent {
            self.mark_dead(
                id,
                &format!("no heartbeat for {:.1}s", silence.as_secs_f64()),
            );
        }
    }

    /// Every worker ever registered, by id.
    pub fn workers(&self) -> Vec<WorkerRecord> {
        self.lock().values().cloned().collect()
    }

    /// The live workers, by id.
    pub fn alive(&self) -> Vec<WorkerRecord> {
        self.lock()
            .values()
            .filter(|w| w.is_alive())
            .cloned()
            .collect()
    }

    pub fn get(&self, id: u64) -> Option<WorkerRecord> {
        self.lock().get(&id).cloned()
    }

    pub fn is_alive(&self, id: u64) -> bool {
        self.lock().get(&id).is_some_and(|w| w.is_alive())
    }

    pub fn is_reachable(&self, id: u64) -> bool {
        self.lock().get(&id).is_some_and(|w| w.is_reachable())
    }

    /// Why worker `id` cannot be used, for messages: "worker 2 (...) is dead: ...".
    pub fn unavailable(&self, id: u64) -> String {
        match self.get(id) {
            Some(w) => format!("{} is {}", w.describe(), w.status),
            None => format!("worker {id} is unknown"),
        }
    }

    /// Counts tasks a worker completed.
    pub fn tasks_done(&self, id: u64, count: u64) {
        if let Some(w) = self.lock().get_mut(&id) {
            w.tasks_done = w.tasks_done.saturating_add(count);
        }
    }

    pub fn set_installed(&self, id: u64, version: u64) {
        if let Some(w) = self.lock().get_mut(&id) {
            w.installed = version;
        }
    }

    /// Waits until at least `count` workers are alive, or `timeout` passes.
    pub async fn wait_for_workers(&self, count: usize, timeout: Duration) -> Result<()> {
        let mut rx = self.membership.subscribe();
        let waited = tokio::time::timeout(timeout, async {
            loop {
                if self.alive().len() >= count {
                    return;
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
        match waited {
            Ok(()) if self.alive().len() >= count => Ok(()),
            _ => Err(Error::Internal(format!(
                "{} of {count} workers joined within {timeout:?}",
                self.alive().len()
            ))),
        }
    }

    /// Makes the same call to each of `workers`, all at once, each through
    /// [`Cluster::call`]; the answers come back with the worker's id.
    pub async fn call_each<T, F, Fut>(
        &self,
        workers: &[WorkerRecord],
        what: &str,
        call: F,
    ) -> Vec<(u64, Result<T>)>
    where
        F: Fn(WorkerClient) -> Fut,
        Fut: Future<Output = std::result::Result<T, Status>>,
    {
        let calls = workers
            .iter()
            .map(|w| async { (w.id, self.call(w.id, what, call(w.client.clone())).await) });
        futures::future::join_all(calls).await
    }

    /// Runs `call` against worker `id`, giving up with a clear error as soon as the
    /// worker is declared dead (or has left). A transport failure declares the worker
    /// dead.
    pub async fn call<T, F>(&self, id: u64, what: &str, call: F) -> Result<T>
    where
        F: Future<Output = std::result::Result<T, Status>>,
    {
        if !self.is_reachable(id) {
            return Err(Error::WorkerLost(format!(
                "cannot {what}: {}",
                self.unavailable(id)
            )));
        }
        let mut rx = self.membership.subscribe();
        tokio::pin!(call);
        loop {
            tokio::select! {
                result = &mut call => {
                    return match result {
                        Ok(response) => Ok(response),
                        // A connection cut mid-call may not say so: a worker that
                        // failed a call and then does not answer is dead too.
                        Err(status) if is_transport_failure(&status) || !self.answers(id).await => {
                            self.mark_dead(id, &format!("connection failed: {}", status.message()));
                            Err(Error::WorkerLost(format!("cannot {what}: {}", self.unavailable(id))))
                        }
                        Err(status) => Err(Error::from_status(&status)),
                    };
                }
                changed = rx.changed() => {
                    if changed.is_err() || !self.is_reachable(id) {
                        return Err(Error::WorkerLost(format!("cannot {what}: {}", self.unavailable(id))));
                    }
                }
            }
        }
    }
}

impl Cluster {
    /// Whether worker `id` answers a status call. Slow is not dead: a worker that
    /// takes longer than [`PROBE_WAIT`] is left to its heartbeats.
    async fn answers(&self, id: u64) -> bool {
        let Some(worker) = self.get(id) else {
            return false;
        };
        match tokio::time::timeout(PROBE_WAIT, worker.client.status(proto::StatusRequest {})).await
        {
            Ok(answer) => answer.is_ok(),
            Err(_) => true,
        }
    }
}

fn is_transport_failure(status: &Status) -> bool {
    status.code() == tonic::Code::Unavailable
}

/// The `Coordinator` gRPC service workers call.
#[derive(Debug)]
pub struct CoordinatorService {
    cluster: Arc<Cluster>,
}

impl CoordinatorService {
    pub fn new(cluster: Arc<Cluster>) -> Self {
        CoordinatorService { cluster }
    }
}

#[tonic::async_trait]
impl proto::coordinator_server::Coordinator for CoordinatorService {
    async fn register(
        &self,
        request: Request<proto::RegisterRequest>,
    ) -> std::result::Result<Response<proto::RegisterResponse>, Status> {
        let request = request.into_inner();
        let worker_id = self
            .cluster
            .register(request.address, request.pid)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(Response::new(proto::RegisterResponse {
            worker_id,
            heartbeat_millis: HEARTBEAT.as_millis() as u64,
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<proto::HeartbeatRequest>,
    ) -> std::result::Result<Response<proto::HeartbeatResponse>, Status> {
        let request = request.into_inner();
        let known = self
            .cluster
            .heartbeat(request.worker_id, request.running_tasks);
        if !known {
            warn!(
                worker = request.worker_id,
                "heartbeat from a worker that is not alive here"
            );
        }
        Ok(Response::new(proto::HeartbeatResponse { known }))
    }

    async fn leave(
        &self,
        request: Request<proto::LeaveRequest>,
    ) -> std::result::Result<Response<proto::LeaveResponse>, Status> {
        let id = request.into_inner().worker_id;
        self.cluster.leave(id);
        let handed_over = self.cluster.wait_left(id, HANDOVER_WAIT).await;
        Ok(Response::new(proto::LeaveResponse { handed_over }))
    }
}
