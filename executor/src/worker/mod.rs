//! The worker: a process that runs receivers, holds input blocks, shuffle outputs and
//! state partitions, and runs the tasks the coordinator launches.
//!
//! [`run`] registers with the coordinator, heartbeats, and serves two gRPC services on
//! one port: the control plane ([`crate::rpc::proto::worker_server::Worker`], see [`service`]) and
//! the Arrow Flight data plane ([`flight`]). Everything a worker holds lives in its
//! [`WorkerState`].
//!
//! # Layout
//! - [`state`]: [`WorkerState`]: installed definitions, blocks, shuffle outputs, state.
//! - [`install`]: installing catalog objects: planning views the way the coordinator did.
//! - [`service`]: the `Worker` gRPC service: seal, run tasks, commit, cancel.
//! - [`slots`]: task slots, handed to the earliest interval's tasks first.
//! - [`flight`]: the Flight service and the client side of the data plane.
//! - [`handover`]: moving receivers and state partitions off a worker that leaves.
//! - [`checkpoint`]: writing the state partitions held here to the object store.
//! - [`compute`]: the lower-priority runtimes tasks compute and receivers seal on.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::error::{Error, Result};
use crate::rpc::{CONNECTION_WINDOW_BYTES, MAX_MESSAGE_BYTES, STREAM_WINDOW_BYTES, proto};

pub mod checkpoint;
pub mod compute;
pub mod flight;
pub mod handover;
pub mod install;
pub mod service;
pub mod slots;
pub mod state;

pub use state::WorkerState;

/// Where a worker finds its coordinator and how it presents itself.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// The coordinator's gRPC address, e.g. `http://127.0.0.1:6876`.
    pub coordinator: String,
    /// The address other processes reach this worker at; by default the listener's.
    pub advertise: Option<String>,
    /// Task slots: how many tasks run at once (Spark's executor cores).
    pub cores: usize,
    /// Credentials for an `s3://` store, if not in the environment (in-process
    /// workers get the server's configured ones here).
    pub s3_credentials: dstream_storage::S3Options,
    /// Fault injection: every task of this worker first waits this long, making it
    /// a straggler (for testing and measuring speculation). Zero normally.
    pub task_delay: std::time::Duration,
    /// Fault injection: a task of this view aborts the worker process once it has
    /// started (for testing that a view whose tasks kill workers is stopped). `None`
    /// normally.
    pub abort_view: Option<String>,
}

/// Runs a worker on `listener` until `shutdown` is cancelled or the coordinator is gone
/// for good. On shutdown the worker leaves the cluster cleanly.
pub async fn run(
    config: WorkerConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<()> {
    let local: SocketAddr = listener.local_addr()?;
    let address = config
        .advertise
        .clone()
        .unwrap_or_else(|| format!("http://{local}"));
    let state = Arc::new(WorkerState::with_task_delay(
        address.clone(),
        config.cores,
        config.task_delay,
    ));
    if !config.task_delay.is_zero() {
        tracing::warn!(delay = ?config.task_delay, "fault injection: every task of this worker is delayed");
    }
    if let Some(view) = &config.abort_view {
        tracing::warn!(%view, "fault injection: a task of this view aborts the worker");
        state.tasks.set_abort_view(view.clone());
    }
    state.set_credentials(config.s3_credentials.clone());
    // Not a child of `shutdown`: a leaving worker serves on until its work has been
    // handed over.
    let serving = CancellationToken::new();
    let server = serve(state.clone(), listener, serving.clone());
    let membership = membership(&config, &state, &address, shutdown.clone()).await;
    serving.cancel();
    let served = server
        .await
        .map_err(|e| Error::Internal(format!("worker server task: {e}")))?;
    served.map_err(|e| Error::Internal(format!("worker server: {e}")))?;
    membership
}

/// Serves the `Worker` control-plane service and the Flight data plane for `state` on
/// `listener` until `stop` is cancelled.
pub fn serve(
    state: Arc<WorkerState>,
    listener: TcpListener,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<std::result::Result<(), tonic::transport::Error>> {
    let worker_service =
        proto::worker_server::WorkerServer::new(service::WorkerService::new(state.clone()))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let flight_service = arrow_flight::flight_service_server::FlightServiceServer::new(
        flight::FlightEndpoint::new(state),
    )
    .max_decoding_message_size(MAX_MESSAGE_BYTES)
    .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let server = tonic::transport::Server::builder()
        .initial_stream_window_size(STREAM_WINDOW_BYTES)
        .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
        .add_service(worker_service)
        .add_service(flight_service)
        .serve_with_incoming_shutdown(tokio_stream_listener(listener), stop.cancelled_owned());
    #[allow(clippy::disallowed_methods)] // the caller awaits the handle
    tokio::spawn(server)
}

/// Registers, heartbeats until shutdown, then leaves. Registers again when the
/// coordinator forgot this worker; gives up when the coordinator cannot be reached for
/// [`COORDINATOR_GONE`].
async fn membership(
    config: &WorkerConfig,
    state: &Arc<WorkerState>,
    address: &str,
    shutdown: CancellationToken,
) -> Result<()> {
    let mut client = connect_coordinator(&config.coordinator, &shutdown).await?;
    let mut registered = None;
    let mut unreachable_since: Option<std::time::Instant> = None;
    let mut every = Duration::from_millis(500);
    loop {
        if shutdown.is_cancelled() {
            break;
        }
        let outcome = match registered {
            None => client
                .register(proto::RegisterRequest {
                    address: address.to_string(),
                    pid: std::process::id(),
                })
                .await
                .map(|r| {
                    let r = r.into_inner();
                    state.set_id(r.worker_id);
                    registered = Some(r.worker_id);
                    every = Duration::from_millis(r.heartbeat_millis.max(50));
                    info!(worker = r.worker_id, %address, "registered with the coordinator");
                }),
            Some(id) => {
                let answer = client
                    .heartbeat(proto::HeartbeatRequest {
                        worker_id: id,
                        running_tasks: state.tasks.running(),
                    })
                    .await;
                if matches!(&answer, Ok(r) if !r.get_ref().known) {
                    warn!(
                        worker = id,
                        "the coordinator does not know this worker; registering again"
                    );
                    state.reset().await;
                    registered = None;
                }
                answer.map(|_| ())
            }
        };
        match outcome {
            Ok(()) => unreachable_since = None,
            Err(status) => {
                let since = *unreachable_since.get_or_insert_with(std::time::Instant::now);
                warn!(error = %status.message(), "cannot reach the coordinator");
                if since.elapsed() > COORDINATOR_GONE {
                    return Err(Error::Internal(format!(
                        "the coordinator at {} has been unreachable for {:?}; stopping",
                        config.coordinator, COORDINATOR_GONE
                    )));
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(every) => {}
        }
    }
    if let Some(id) = registered {
        leave(&config.coordinator, id).await;
    }
    Ok(())
}

/// Tells the coordinator this worker leaves, and waits while it hands the worker's
/// receivers and state partitions over to other workers (they are fetched from here,
/// so the worker serves on until the answer).
async fn leave(coordinator: &str, id: u64) {
    info!(worker = id, "leaving the cluster; handing work over");
    let left = tokio::time::timeout(LEAVE_WAIT, async {
        // A channel without the per-call timeout: the handover waits for the interval
        // in progress.
        let channel = tonic::transport::Endpoint::from_shared(coordinator.to_string())
            .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?
            .connect_timeout(Duration::from_secs(2))
            .connect()
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        proto::coordinator_client::CoordinatorClient::new(channel)
            .leave(proto::LeaveRequest { worker_id: id })
            .await
    })
    .await;
    match left {
        Ok(Ok(answer)) if answer.get_ref().handed_over => {
            info!(worker = id, "left the cluster; work handed over")
        }
        Ok(Ok(_)) => info!(worker = id, "left the cluster; nothing was handed over"),
        Ok(Err(status)) => warn!(
            worker = id,
            error = %status.message(),
            "could not tell the coordinator that this worker leaves"
        ),
        Err(_) => warn!(
            worker = id,
            "the coordinator did not finish the handover within {LEAVE_WAIT:?}; leaving anyway"
        ),
    }
}

/// How long a leaving worker waits for its handover.
const LEAVE_WAIT: Duration = Duration::from_secs(60);

/// How long a worker keeps trying to reach a coordinator that stopped answering.
const COORDINATOR_GONE: Duration = Duration::from_secs(30);

async fn connect_coordinator(
    url: &str,
    shutdown: &CancellationToken,
) -> Result<proto::coordinator_client::CoordinatorClient<tonic::transport::Channel>> {
    let endpoint = tonic::transport::Endpoint::from_shared(url.to_string())
        .map_err(|e| Error::Config(format!("bad coordinator address '{url}': {e}")))?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(10));
    let started = std::time::Instant::now();
    loop {
        match endpoint.connect().await {
            Ok(channel) => return Ok(proto::coordinator_client::CoordinatorClient::new(channel)),
            Err(e) if started.elapsed() < COORDINATOR_GONE && !shutdown.is_cancelled() => {
                warn!(coordinator = %url, error = %e, "waiting for the coordinator");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => {
                return Err(Error::Internal(format!(
                    "cannot reach the coordinator at {url}: {e}"
                )));
            }
        }
    }
}

/// The accepted connections of `listener`, with Nagle's algorithm off.
pub fn tokio_stream_listener(
    listener: TcpListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures::stream::unfold(listener, |listener| async move {
        let accepted = listener.accept().await.map(|(stream, _)| {
            let _ = stream.set_nodelay(true);
            stream
        });
        Some((accepted, listener))
    })
}
