//! The workers `dstream serve` starts itself: child processes running
//! `dstream worker` (the default), or workers inside the server process.
//!
//! [`LocalWorkers`] owns and supervises them: each worker runs in a *slot* whose
//! supervisor starts it again when it dies — after a backoff that doubles from
//! [`Restarts::first_backoff`] up to [`Restarts::max_backoff`] — and the new worker
//! joins the coordinator and takes partitions as any joining worker does (a worker
//! that exits cleanly, as it does after handing its work over on SIGTERM, left on
//! purpose and is not started again). A slot
//! whose worker dies [`Restarts::max_quick_deaths`] times in a row, each within
//! [`Restarts::healthy_after`] of its start, is in a crash loop: its supervisor logs
//! it, reports it in `dstream_workers`, and gives up. Child processes are stopped
//! when the server stops (and stop by themselves when the coordinator is gone, since
//! they cannot reach it); in-process workers stop with the server's shutdown token.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dstream_executor::worker::{WorkerConfig, run as run_worker};
use dstream_storage::S3Options;
use tokio::net::TcpListener;
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::Cluster;
use crate::error::{Error, Result};

/// How `dstream serve` runs its workers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WorkerMode {
    /// Child processes of this program (or of the given executable).
    Process(Option<PathBuf>),
    /// Tasks inside the server process, over the same gRPC and Flight interfaces.
    InProcess,
}

/// When a supervisor starts a dead worker again, and when it gives up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Restarts {
    /// Whether dead workers are started again at all.
    pub enabled: bool,
    /// The wait before the first restart; it doubles with each quick death.
    pub first_backoff: Duration,
    /// The longest wait between restarts.
    pub max_backoff: Duration,
    /// A worker that lived this long was healthy: its death starts the count afresh.
    pub healthy_after: Duration,
    /// Deaths in a row, each before `healthy_after`, after which the slot gives up.
    pub max_quick_deaths: u32,
}

impl Default for Restarts {
    fn default() -> Self {
        Restarts {
            enabled: true,
            first_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
            healthy_after: Duration::from_secs(60),
            max_quick_deaths: 5,
        }
    }
}

impl Restarts {
    /// The wait before restarting after `quick_deaths` deaths in a row.
    fn backoff(&self, quick_deaths: u32) -> Duration {
        let doublings = quick_deaths.saturating_sub(1).min(16);
        self.first_backoff
            .saturating_mul(1 << doublings)
            .min(self.max_backoff)
    }
}

/// What a slot's supervisor knows, for `dstream_workers` and the tests.
#[derive(Clone, Debug, Default)]
struct SlotState {
    /// The process id of the slot's current worker process.
    pid: Option<u32>,
    /// Times the slot's worker was started again.
    restarts: u32,
    /// How its last worker ended.
    last_exit: Option<String>,
    /// Set when the supervisor gave up: why.
    gave_up: Option<String>,
    /// Whether the supervisor still watches the slot (and so starts a worker that
    /// dies again).
    supervised: bool,
}

/// What the supervisors of one server share.
#[derive(Debug, Default)]
struct Slots {
    slots: Mutex<Vec<SlotState>>,
}

impl Slots {
    fn update(&self, slot: usize, f: impl FnOnce(&mut SlotState)) {
        let mut slots = match self.slots.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(state) = slots.get_mut(slot) {
            f(state);
        }
    }

    fn read(&self) -> Vec<SlotState> {
        match self.slots.lock() {
            Ok(s) => s.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

/// How to start one local worker.
#[derive(Clone, Debug)]
pub struct Launch {
    pub mode: WorkerMode,
    /// Its task slots.
    pub cores: usize,
    /// The coordinator's gRPC URL.
    pub coordinator: String,
    /// Credentials of an `s3://` store given in the configuration: they reach worker
    /// processes through their environment, never over the network.
    pub s3: S3Options,
}

/// Workers started by this server, each under a supervisor.
#[derive(Debug, Default)]
pub struct LocalWorkers {
    supervisors: Vec<tokio::task::JoinHandle<()>>,
    slots: Arc<Slots>,
    stop: CancellationToken,
}

impl LocalWorkers {
    /// Starts `count` workers as `launch` says, each restarted after it dies as
    /// `restarts` says; a dead worker's process is reported to `cluster` at once.
    /// Fails if a worker process cannot be started at all (a missing executable is a
    /// configuration error).
    pub async fn start(
        count: usize,
        launch: Launch,
        restarts: Restarts,
        cluster: Arc<Cluster>,
        shutdown: &CancellationToken,
    ) -> Result<LocalWorkers> {
        let stop = shutdown.child_token();
        let slots = Arc::new(Slots {
            slots: Mutex::new(vec![
                SlotState {
                    supervised: restarts.enabled,
                    ..SlotState::default()
                };
                count
            ]),
        });
        let mut supervisors = Vec::with_capacity(count);
        for slot in 0..count {
            let first = launch.start(slot, &stop).await?;
            slots.update(slot, |s| s.pid = first.pid());
            #[allow(clippy::disallowed_methods)] // kept in `supervisors`, awaited in `stop`
            let supervisor = tokio::spawn(supervise(
                slot,
                first,
                launch.clone(),
                restarts,
                (slots.clone(), cluster.clone()),
                stop.clone(),
            ));
            supervisors.push(supervisor);
        }
        Ok(LocalWorkers {
            supervisors,
            slots,
            stop,
        })
    }

    /// What the supervisors report, for readers that outlive a lock on `self`.
    pub fn supervision(&self) -> Supervision {
        Supervision(self.slots.clone())
    }

    /// Stops every worker and waits for it.
    pub async fn stop(&mut self) {
        self.stop.cancel();
        for supervisor in self.supervisors.drain(..) {
            if let Err(e) = supervisor.await {
                warn!(error = %e, "a worker supervisor panicked");
            }
        }
    }
}

/// What the supervisors of a server report: their workers' process ids and how
/// often each was restarted.
#[derive(Clone, Debug, Default)]
pub struct Supervision(Arc<Slots>);

impl Supervision {
    /// The process ids of the current worker processes (tests kill them to simulate
    /// failures).
    pub fn pids(&self) -> Vec<u32> {
        self.0.read().iter().filter_map(|s| s.pid).collect()
    }

    /// Whether a supervisor will start a worker that dies (or has died) again: the
    /// coordinator can wait for it instead of giving up on work with no live worker.
    pub fn restarting(&self) -> bool {
        self.0.read().iter().any(|s| s.supervised)
    }

    /// What the supervisor says of each local worker process, by process id: how
    /// often its slot was restarted, how its last worker ended, and whether it gave
    /// up.
    pub fn by_pid(&self) -> HashMap<u32, String> {
        let mut out = HashMap::new();
        for (i, slot) in self.0.read().iter().enumerate() {
            let Some(pid) = slot.pid else { continue };
            let mut text = format!("local worker {i}");
            if slot.restarts > 0 {
                text.push_str(&format!(", restarts: {}", slot.restarts));
            }
            if let Some(why) = &slot.gave_up {
                text.push_str(&format!(", not restarted: {why}"));
            } else if let Some(exit) = &slot.last_exit {
                text.push_str(&format!(", last exit: {exit}"));
            }
            out.insert(pid, text);
        }
        out
    }
}

/// One running worker of a slot.
enum Running {
    Process(Child),
    Task(
        tokio::task::JoinHandle<dstream_executor::Result<()>>,
        CancellationToken,
    ),
}

impl Running {
    fn pid(&self) -> Option<u32> {
        match self {
            Running::Process(child) => child.id(),
            Running::Task(..) => None,
        }
    }

    /// Waits until the worker ends, and says how: whether it left cleanly (exit
    /// code 0, as a worker does after handing its work over on SIGTERM), and what
    /// ended it.
    async fn ended(&mut self) -> (bool, String) {
        match self {
            Running::Process(child) => match child.wait().await {
                Ok(status) => (status.success(), describe_exit(status)),
                Err(e) => (false, format!("cannot wait for the process: {e}")),
            },
            Running::Task(task, _) => match task.await {
                Ok(Ok(())) => (true, "stopped".into()),
                Ok(Err(e)) => (false, format!("failed: {e}")),
                Err(e) => (false, format!("panicked: {e}")),
            },
        }
    }

    /// Stops the worker: a process is asked to leave (SIGTERM), then killed if it
    /// has not stopped within 3 s.
    async fn stop(self) {
        match self {
            Running::Process(mut child) => {
                if let Some(pid) = child.id() {
                    let _ = std::process::Command::new("kill")
                        .args(["-TERM", &pid.to_string()])
                        .status();
                }
                if tokio::time::timeout(Duration::from_secs(3), child.wait())
                    .await
                    .is_err()
                {
                    warn!("a worker process did not stop; killing it");
                    let _ = child.kill().await;
                }
            }
            Running::Task(task, token) => {
                token.cancel();
                match task.await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => warn!(error = %e, "an in-process worker stopped with an error"),
                    Err(e) => warn!(error = %e, "an in-process worker panicked"),
                }
            }
        }
    }
}

fn describe_exit(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        (None, None) => status.to_string(),
    }
}

impl Launch {
    async fn start(&self, slot: usize, stop: &CancellationToken) -> Result<Running> {
        match &self.mode {
            WorkerMode::Process(program) => {
                let program = match program {
                    Some(p) => p.clone(),
                    None => std::env::current_exe()?,
                };
                let mut command = Command::new(&program);
                if let Some(key) = &self.s3.access_key_id {
                    command.env("AWS_ACCESS_KEY_ID", key);
                }
                if let Some(secret) = &self.s3.secret_access_key {
                    command.env("AWS_SECRET_ACCESS_KEY", secret);
                }
                let child = command
                    .args(["worker", "--coordinator", &self.coordinator])
                    .args(["--cores", &self.cores.to_string()])
                    .stdin(Stdio::null())
                    .kill_on_drop(true)
                    .spawn()
                    .map_err(|e| {
                        Error::Config(format!(
                            "cannot start worker process {}: {e}",
                            program.display()
                        ))
                    })?;
                info!(worker = slot, pid = child.id(), "started worker process");
                Ok(Running::Process(child))
            }
            WorkerMode::InProcess => {
                let listener = TcpListener::bind("127.0.0.1:0").await?;
                let config = WorkerConfig {
                    coordinator: self.coordinator.clone(),
                    advertise: None,
                    cores: self.cores,
                    s3_credentials: S3Options {
                        access_key_id: self.s3.access_key_id.clone(),
                        secret_access_key: self.s3.secret_access_key.clone(),
                        ..Default::default()
                    },
                    task_delay: Duration::ZERO,
                    abort_view: None,
                };
                let token = stop.child_token();
                #[allow(clippy::disallowed_methods)] // kept in `Running::Task`, awaited
                let task = tokio::spawn(run_worker(config, listener, token.clone()));
                Ok(Running::Task(task, token))
            }
        }
    }
}

/// Watches a slot's worker until the server stops, starting it again when it dies.
async fn supervise(
    slot: usize,
    running: Running,
    launch: Launch,
    restarts: Restarts,
    (slots, cluster): (Arc<Slots>, Arc<Cluster>),
    stop: CancellationToken,
) {
    let watched = watch_slot(
        slot,
        running,
        launch,
        restarts,
        (slots.clone(), cluster),
        stop,
    );
    watched.await;
    slots.update(slot, |s| s.supervised = false);
}

async fn watch_slot(
    slot: usize,
    mut running: Running,
    launch: Launch,
    restarts: Restarts,
    (slots, cluster): (Arc<Slots>, Arc<Cluster>),
    stop: CancellationToken,
) {
    let mut quick_deaths = 0u32;
    let mut started = Instant::now();
    loop {
        let pid = running.pid();
        let (clean, exit) = tokio::select! {
            _ = stop.cancelled() => {
                running.stop().await;
                return;
            }
            exit = running.ended() => exit,
        };
        if stop.is_cancelled() {
            return;
        }
        if !clean && let Some(pid) = pid {
            // The coordinator need not wait for missed heartbeats: the process is gone.
            for worker in cluster.workers() {
                if worker.pid == pid && worker.is_reachable() {
                    cluster.mark_dead(worker.id, &format!("its process ended ({exit})"));
                }
            }
        }
        slots.update(slot, |s| s.last_exit = Some(exit.clone()));
        if clean {
            // It was asked to leave (SIGTERM) and handed its work over.
            info!(
                worker = slot,
                "a local worker left; it is not started again"
            );
            return;
        }
        if !restarts.enabled {
            warn!(worker = slot, %exit, "a local worker ended; restarts are off");
            return;
        }
        if started.elapsed() >= restarts.healthy_after {
            quick_deaths = 0;
        }
        quick_deaths = quick_deaths.saturating_add(1);
        if quick_deaths > restarts.max_quick_deaths {
            let why = format!(
                "crash loop: ended {quick_deaths} times in a row within {:?} of starting, \
                 last: {exit}",
                restarts.healthy_after
            );
            error!(worker = slot, %why, "giving up on a local worker");
            slots.update(slot, |s| s.gave_up = Some(why));
            return;
        }
        let backoff = restarts.backoff(quick_deaths);
        warn!(worker = slot, %exit, ?backoff, "a local worker ended; starting it again");
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        // A worker that cannot even be started counts as a quick death.
        running = loop {
            started = Instant::now();
            match launch.start(slot, &stop).await {
                Ok(r) => break r,
                Err(e) => {
                    quick_deaths = quick_deaths.saturating_add(1);
                    warn!(worker = slot, error = %e, "cannot start a local worker");
                    if quick_deaths > restarts.max_quick_deaths {
                        let why = format!("cannot start it: {e}");
                        error!(worker = slot, %why, "giving up on a local worker");
                        slots.update(slot, |s| s.gave_up = Some(why));
                        return;
                    }
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(restarts.backoff(quick_deaths)) => {}
                    }
                }
            }
        };
        slots.update(slot, |s| {
            s.pid = running.pid();
            s.restarts = s.restarts.saturating_add(1);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_most() {
        let restarts = Restarts::default();
        assert_eq!(restarts.backoff(1), Duration::from_millis(500));
        assert_eq!(restarts.backoff(2), Duration::from_secs(1));
        assert_eq!(restarts.backoff(4), Duration::from_secs(4));
        assert_eq!(restarts.backoff(20), Duration::from_secs(30));
    }

    #[tokio::test]
    async fn a_worker_that_keeps_dying_is_restarted_then_given_up() -> Result<()> {
        // `false` ends at once: every start is a quick death.
        let restarts = Restarts {
            first_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(40),
            max_quick_deaths: 3,
            ..Restarts::default()
        };
        let shutdown = CancellationToken::new();
        let launch = Launch {
            mode: WorkerMode::Process(Some(PathBuf::from("false"))),
            cores: 1,
            coordinator: "http://127.0.0.1:1".into(),
            s3: S3Options::default(),
        };
        let mut workers =
            LocalWorkers::start(1, launch, restarts, Arc::new(Cluster::default()), &shutdown)
                .await?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let slot = loop {
            let slot = workers.slots.read().remove(0);
            if slot.gave_up.is_some() || Instant::now() > deadline {
                break slot;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(slot.restarts, 3, "{slot:?}");
        assert_eq!(slot.last_exit.as_deref(), Some("exit code 1"));
        let why = slot.gave_up.unwrap_or_default();
        assert!(why.contains("crash loop"), "{why}");
        let report = workers.supervision().by_pid();
        assert!(
            report
                .values()
                .any(|r| r.contains("restarts: 3") && r.contains("not restarted: crash loop")),
            "{report:?}"
        );
        workers.stop().await;
        Ok(())
    }
}
