//! The workers `dstream serve` starts itself: child processes running
//! `dstream worker` (the default), or workers inside the server process.
//!
//! [`LocalWorkers`] owns them: child processes are killed when the server stops (and
//! when it dies, since they stop once the coordinator is unreachable); in-process
//! workers stop with the server's shutdown token.

use std::path::PathBuf;
use std::process::Stdio;

use dstream_executor::worker::{WorkerConfig, run as run_worker};
use dstream_storage::S3Options;
use tokio::net::TcpListener;
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::error::{Error, Result};

/// How `dstream serve` runs its workers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WorkerMode {
    /// Child processes of this program (or of the given executable).
    Process(Option<PathBuf>),
    /// Tasks inside the server process, over the same gRPC and Flight interfaces.
    InProcess,
}

/// Workers started by this server.
#[derive(Debug, Default)]
pub struct LocalWorkers {
    children: Vec<Child>,
    tasks: Vec<tokio::task::JoinHandle<dstream_executor::Result<()>>>,
}

impl LocalWorkers {
    /// Starts `count` workers that join the coordinator at `coordinator`.
    /// Credentials of an `s3://` store given in the configuration reach worker
    /// processes through their environment (`s3`), never over the network.
    pub async fn start(
        count: usize,
        cores: usize,
        mode: &WorkerMode,
        coordinator: &str,
        s3: &S3Options,
        shutdown: &CancellationToken,
    ) -> Result<LocalWorkers> {
        let mut workers = LocalWorkers::default();
        for i in 0..count {
            match mode {
                WorkerMode::Process(program) => {
                    let program = match program {
                        Some(p) => p.clone(),
                        None => std::env::current_exe()?,
                    };
                    let mut command = Command::new(&program);
                    if let Some(key) = &s3.access_key_id {
                        command.env("AWS_ACCESS_KEY_ID", key);
                    }
                    if let Some(secret) = &s3.secret_access_key {
                        command.env("AWS_SECRET_ACCESS_KEY", secret);
                    }
                    let child = command
                        .args(["worker", "--coordinator", coordinator])
                        .args(["--cores", &cores.to_string()])
                        .stdin(Stdio::null())
                        .kill_on_drop(true)
                        .spawn()
                        .map_err(|e| {
                            Error::Config(format!(
                                "cannot start worker process {}: {e}",
                                program.display()
                            ))
                        })?;
                    info!(worker = i, pid = child.id(), "started worker process");
                    workers.children.push(child);
                }
                WorkerMode::InProcess => {
                    let listener = TcpListener::bind("127.0.0.1:0").await?;
                    let config = WorkerConfig {
                        coordinator: coordinator.to_string(),
                        advertise: None,
                        cores,
                        s3_credentials: S3Options {
                            access_key_id: s3.access_key_id.clone(),
                            secret_access_key: s3.secret_access_key.clone(),
                            ..Default::default()
                        },
                        task_delay: std::time::Duration::ZERO,
                    };
                    #[allow(clippy::disallowed_methods)] // kept in `tasks`, awaited in `stop`
                    let task = tokio::spawn(run_worker(config, listener, shutdown.child_token()));
                    workers.tasks.push(task);
                }
            }
        }
        Ok(workers)
    }

    /// The process ids of worker processes (tests kill them to simulate failures).
    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().filter_map(|c| c.id()).collect()
    }

    /// Stops every worker and waits for it.
    pub async fn stop(&mut self) {
        for child in &mut self.children {
            if let Some(pid) = child.id() {
                // Ask nicely first, so the worker leaves the cluster.
                let _ = std::process::Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status();
            }
            match tokio::time::timeout(std::time::Duration::from_secs(3), child.wait()).await {
                Ok(_) => {}
                Err(_) => {
                    warn!("a worker process did not stop; killing it");
                    let _ = child.kill().await;
                }
            }
        }
        for task in self.tasks.drain(..) {
            match task.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => warn!(error = %e, "an in-process worker stopped with an error"),
                Err(e) => warn!(error = %e, "an in-process worker panicked"),
            }
        }
    }
}
