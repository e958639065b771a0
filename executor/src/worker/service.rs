//! The `Worker` gRPC service: what the coordinator asks a worker to do.
//!
//! - `Install`/`Remove`: catalog objects (see [`super::install`]).
//! - `Seal`: every receiver on this worker hands over the interval's records; each
//!   block is stored here and put to the replica worker before the answer, so the
//!   loss of one worker loses no sealed input.
//! - `RunTasks`: map tasks (a view's stateless part over a local block, split into P
//!   shuffle pieces kept here) and reduce tasks (the pieces of one partition, read
//!   locally or fetched over Flight with one request per worker that holds some,
//!   folded into the partition's state). Tasks wait for a slot ([`super::slots`]).
//!   Outputs wait for `Commit`; `Cancel` drops them.
//! - `AwaitCheckpoint`: a checkpoint asked for in `Commit` is written in the
//!   background (see [`super::checkpoint`]); this waits for it.
//! - `ReleaseReceiver`/`AdoptReceiver`/`DescribePartition`/`AdoptPartition`: handing
//!   work over when a worker leaves (see [`super::handover`]).

use std::sync::Arc;
use std::time::Instant;

use arrow::array::RecordBatch;
use dstream_storage::{IntervalId, Timeline};
use tokio::task::JoinSet;
use tonic::{Request, Response, Status};
use tracing::warn;

use super::state::{InstalledView, PartitionSlot, WorkerState};
use super::{checkpoint, handover, install};
use crate::block::Block;
use crate::error::{Error, Result};
use crate::operator::{PartitionInput, ShufflePiece, ViewUpdate};
use crate::rpc::FlightPeers;
use crate::rpc::codec::timeline;
use crate::rpc::proto::{self, data_ticket::Kind, task::Kind as TaskKind};
use crate::rpc::{ipc_bytes, read_ipc, status};
use crate::shuffle::Wanted;
use crate::view_runtime::conform;

/// The results of a `RunTasks` call, streamed as its tasks finish.
pub type TaskResults = std::pin::Pin<
    Box<dyn futures::Stream<Item = std::result::Result<proto::TaskResult, Status>> + Send>,
>;

/// The control-plane service of one worker.
#[derive(Debug)]
pub struct WorkerService {
    state: Arc<WorkerState>,
    peers: Arc<FlightPeers>,
}

impl WorkerService {
    pub fn new(state: Arc<WorkerState>) -> Self {
        WorkerService {
            state,
            peers: Arc::new(FlightPeers::default()),
        }
    }
}

#[tonic::async_trait]
impl proto::worker_server::Worker for WorkerService {
    async fn install(
        &self,
        request: Request<proto::InstallRequest>,
    ) -> std::result::Result<Response<proto::InstallResponse>, Status> {
        // Planning a view recurses over its expressions: it runs on the task threads'
        // deep stacks, as the view's tasks do.
        let state = self.state.clone();
        let installing = async move { install::install(&state, request.into_inner()).await };
        self.state
            .compute()
            .await
            .map_err(|e| status(&e))?
            .run(installing)
            .await
            .and_then(|installed| installed)
            .map_err(|e| status(&e))?;
        Ok(Response::new(proto::InstallResponse {}))
    }

    async fn remove(
        &self,
        request: Request<proto::RemoveRequest>,
    ) -> std::result::Result<Response<proto::RemoveResponse>, Status> {
        install::remove(&self.state, &request.into_inner().name)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(proto::RemoveResponse {}))
    }

    async fn seal(
        &self,
        request: Request<proto::SealRequest>,
    ) -> std::result::Result<Response<proto::SealResponse>, Status> {
        let request = request.into_inner();
        let timeline = timeline(request.timeline)?;
        let interval = IntervalId(request.interval);
        let started = std::time::Instant::now();
        // The seal finishes even if the coordinator stops waiting: a receiver's input
        // is cut once.
        let (state, peers) = (self.state.clone(), self.peers.clone());
        let sources = self
            .state
            .ingest()
            .await
            .map_err(|e| status(&e))?
            .run_to_end(async move { seal(&state, &peers, interval, &timeline, &request).await })
            .await
            .map_err(|e| status(&e))?;
        tracing::debug!(%interval, elapsed = ?started.elapsed(), "sealed");
        Ok(Response::new(proto::SealResponse { sources }))
    }

    type RunTasksStream = TaskResults;

    async fn run_tasks(
        &self,
        request: Request<proto::RunTasksRequest>,
    ) -> std::result::Result<Response<TaskResults>, Status> {
        let tasks = request.into_inner().tasks;
        let Some(interval) = tasks.first().map(|t| IntervalId(t.interval)) else {
            return Ok(Response::new(Box::pin(futures::stream::empty())));
        };
        let cancel = self.state.tasks.cancel_token(interval);
        let (events, received) = tokio::sync::mpsc::unbounded_channel();
        let mut running = JoinSet::new();
        for task in tasks {
            let (state, peers) = (self.state.clone(), self.peers.clone());
            let abandon = state.tasks.task_token(interval, task.id);
            let events = events.clone();
            running.spawn(async move {
                let id = task.id;
                let outcome = tokio::select! {
                    biased;
                    _ = abandon.cancelled() => Err(Error::Internal(format!("task {id} was abandoned"))),
                    outcome = async {
                        // A reduce task reads its remote inputs before it takes a
                        // slot, so that a worker's tasks fetch while others compute.
                        let arrived = Instant::now();
                        let inputs = read_inputs(&state, &peers, &task).await?;
                        let ready = Instant::now();
                        // Wait for a task slot: the earliest interval's tasks get
                        // one first.
                        let slot = state.tasks.slots.acquire(interval).await;
                        let running = state.tasks.started();
                        let _ = events.send(proto::TaskResult { id, started: true, ..Default::default() });
                        let started = Instant::now();
                        if !state.tasks.delay().is_zero() {
                            tokio::time::sleep(state.tasks.delay()).await;
                        }
                        if state.tasks.aborts(&task.view) {
                            // Let the coordinator hear that the task runs, then die
                            // as a task that crashes its process would.
                            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                            tracing::error!(view = %task.view, "fault injection: aborting the worker");
                            std::process::abort();
                        }
                        let (read, waited) = (
                            ready.saturating_duration_since(arrived),
                            started.saturating_duration_since(ready),
                        );
                        let work = {
                            let (state, abandon) = (state.clone(), abandon.clone());
                            async move { run_task(&state, task, inputs, &abandon).await }
                        };
                        let mut result = state.compute().await?.run(work).await??;
                        let ran = started.elapsed();
                        drop((slot, running));
                        // The coordinator times a task from its start to its result,
                        // and compares tasks by this.
                        result.micros = ran.as_micros() as u64;
                        // Where a task's time went: reading its inputs, waiting for a
                        // slot, computing.
                        tracing::debug!(%interval, task = id, ?read, ?waited, ?ran, "task done");
                        Ok(result)
                    } => outcome,
                };
                let mut result = outcome.unwrap_or_else(|e| proto::TaskResult {
                    error: crate::error::executor_message(&e),
                    ..Default::default()
                });
                result.id = id;
                let _ = events.send(result);
            });
        }
        drop(events);
        // Each task's start and result go out as they happen; the stream ends when
        // every task has answered. Dropping it (the coordinator no longer wants the
        // rest) drops the set, which stops the tasks still running.
        let results = futures::stream::unfold(Some((received, running)), move |open| {
            let cancel = cancel.clone();
            async move {
                let (mut received, mut running) = open?;
                // A task that finished without panicking is joined and nothing else
                // happens: `select!` then waits on the other branches.
                tokio::select! {
                    _ = cancel.cancelled() => {
                        running.abort_all();
                        let cancelled = Status::cancelled(format!("interval {interval} was cancelled"));
                        Some((Err(cancelled), None))
                    }
                    event = received.recv() => {
                        event.map(|event| (Ok(event), Some((received, running))))
                    }
                    Some(Err(e)) = running.join_next(), if !running.is_empty() => {
                        let panicked = Status::internal(format!("task panicked: {e}"));
                        Some((Err(panicked), None))
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(results)))
    }

    async fn abandon(
        &self,
        request: Request<proto::AbandonRequest>,
    ) -> std::result::Result<Response<proto::AbandonResponse>, Status> {
        let request = request.into_inner();
        let drop: Vec<(String, u32)> = request
            .drop
            .into_iter()
            .map(|p| (p.view, p.partition))
            .collect();
        self.state
            .abandon(IntervalId(request.interval), &request.tasks, &drop);
        Ok(Response::new(proto::AbandonResponse {}))
    }

    async fn commit(
        &self,
        request: Request<proto::CommitRequest>,
    ) -> std::result::Result<Response<proto::CommitResponse>, Status> {
        let request = request.into_inner();
        let interval = IntervalId(request.interval);
        self.state.partitions.commit(interval);
        if request.checkpoint {
            let store = self
                .state
                .store()
                .ok_or_else(|| Status::failed_precondition("no object store installed"))?;
            checkpoint::start(&self.state, store, interval).await;
        }
        if !request.replay {
            self.state.shuffle.expire(interval);
        }
        let retain = self
            .state
            .installed
            .lock()
            .await
            .as_ref()
            .map_or(1, |i| i.retain_intervals);
        self.state
            .blocks
            .expire(interval, retain, request.keep_from.map(IntervalId));
        self.state.tasks.finish_interval(interval);
        Ok(Response::new(proto::CommitResponse {}))
    }

    async fn await_checkpoint(
        &self,
        request: Request<proto::AwaitCheckpointRequest>,
    ) -> std::result::Result<Response<proto::AwaitCheckpointResponse>, Status> {
        let interval = IntervalId(request.into_inner().interval);
        let partitions = checkpoint::wait(&self.state, interval)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(proto::AwaitCheckpointResponse { partitions }))
    }

    async fn cancel(
        &self,
        request: Request<proto::CancelRequest>,
    ) -> std::result::Result<Response<proto::CancelResponse>, Status> {
        let interval = IntervalId(request.into_inner().interval);
        self.state.tasks.cancel(interval);
        let cancelled = self.state.partitions.discard(interval) as u32;
        // Only this interval's: a cancel that arrives late must not take the map
        // outputs a recovery's replay of earlier intervals is about to read.
        self.state.shuffle.drop_interval(interval);
        Ok(Response::new(proto::CancelResponse { cancelled }))
    }

    async fn status(
        &self,
        _: Request<proto::StatusRequest>,
    ) -> std::result::Result<Response<proto::StatusResponse>, Status> {
        Ok(Response::new(proto::StatusResponse {
            running_tasks: self.state.tasks.running(),
            blocks: self.state.blocks.count(),
            state_partitions: self.state.partitions.count(),
        }))
    }

    async fn release_receiver(
        &self,
        request: Request<proto::ReleaseReceiverRequest>,
    ) -> std::result::Result<Response<proto::ReceiverHandover>, Status> {
        let request = request.into_inner();
        handover::release_receiver(&self.state, &request.source, request.split)
            .await
            .map(Response::new)
            .map_err(|e| status(&e))
    }

    async fn adopt_receiver(
        &self,
        request: Request<proto::ReceiverHandover>,
    ) -> std::result::Result<Response<proto::AdoptReceiverResponse>, Status> {
        handover::adopt_receiver(&self.state, request.into_inner())
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(proto::AdoptReceiverResponse {}))
    }

    async fn describe_partition(
        &self,
        request: Request<proto::DescribePartitionRequest>,
    ) -> std::result::Result<Response<proto::PartitionDescription>, Status> {
        let request = request.into_inner();
        Ok(Response::new(handover::describe_partition(
            &self.state,
            &request.view,
            request.partition,
        )))
    }

    async fn adopt_partition(
        &self,
        request: Request<proto::AdoptPartitionRequest>,
    ) -> std::result::Result<Response<proto::AdoptPartitionResponse>, Status> {
        let request = request.into_inner();
        let description = request.description.ok_or_else(|| {
            Status::invalid_argument("adopting a partition needs its description")
        })?;
        let bytes =
            handover::adopt_partition(&self.state, &self.peers, &request.from_address, description)
                .await
                .map_err(|e| status(&e))?;
        Ok(Response::new(proto::AdoptPartitionResponse { bytes }))
    }

    async fn drop_partition(
        &self,
        request: Request<proto::DescribePartitionRequest>,
    ) -> std::result::Result<Response<proto::DropPartitionResponse>, Status> {
        let request = request.into_inner();
        self.state
            .partitions
            .remove(&request.view, request.partition);
        Ok(Response::new(proto::DropPartitionResponse {}))
    }

    async fn restore_partition(
        &self,
        request: Request<proto::RestorePartitionRequest>,
    ) -> std::result::Result<Response<proto::RestorePartitionResponse>, Status> {
        let bytes = checkpoint::restore(&self.state, request.into_inner())
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(proto::RestorePartitionResponse { bytes }))
    }
}

/// Seals `interval` on every receiver of this worker.
async fn seal(
    state: &Arc<WorkerState>,
    peers: &Arc<FlightPeers>,
    interval: IntervalId,
    timeline: &Timeline,
    request: &proto::SealRequest,
) -> Vec<proto::SealedSource> {
    let mut receivers = state.receivers.lock().await;
    let mut sealed_sources = Vec::new();
    let mut failed = Vec::new();
    let wanted: std::collections::HashSet<(&str, u32)> = request
        .splits
        .iter()
        .map(|s| (s.source.as_str(), s.split))
        .collect();
    for ((name, split), runtime) in receivers.iter_mut() {
        if !wanted.contains(&(name.as_str(), *split)) {
            continue;
        }
        runtime.set_watermark(request.watermarks.get(name).copied());
        // A pushed source seals what the coordinator sent with the request.
        let mut pushed_until = 0;
        if let Some(pushed) = request.pushed.get(name) {
            let taken = read_ipc(&pushed.records)
                .and_then(|batches| runtime.push(batches, pushed.malformed));
            if let Err(e) = taken {
                warn!(source = %name, error = %e, "source failed and stopped");
                sealed_sources.push(proto::SealedSource {
                    source: name.clone(),
                    split: *split,
                    failure: e.to_string(),
                    ..Default::default()
                });
                failed.push((name.clone(), *split));
                continue;
            }
            pushed_until = pushed.until;
        }
        // What late rows are dropped against: part of the seal's lineage.
        let watermark = runtime.watermark();
        // Receivers may read files: keep that off the async worker's back.
        let sealed = match tokio::runtime::Handle::current().runtime_flavor() {
            tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(|| runtime.seal(interval, timeline))
            }
            _ => runtime.seal(interval, timeline),
        };
        let stats = runtime.stats();
        let mut out = proto::SealedSource {
            source: name.clone(),
            split: *split,
            new_files: runtime.take_new_files(),
            watermark: stats.watermark,
            records: stats.receiver.records,
            malformed: stats.receiver.malformed,
            late_rows: stats.late_rows,
            pushed_until,
            ..Default::default()
        };
        match sealed {
            Ok(blocks) => {
                for block in &blocks {
                    state.blocks.put(block.clone());
                }
                // A replayable source's replica keeps how to seal this again, not
                // the rows.
                let lineage = runtime.replayable().then(|| proto::BlockLineage {
                    source: name.clone(),
                    split: *split,
                    splits: runtime.split().count,
                    interval: interval.0,
                    timeline: request.timeline,
                    watermark,
                    blocks: blocks.iter().map(|b| b.index as u32).collect(),
                });
                let replicated = replicate(peers, &request.replica_address, &blocks, lineage).await;
                out.blocks = blocks
                    .iter()
                    .zip(&replicated)
                    .map(|(b, replicated)| {
                        let mut holders = vec![state.id()];
                        if *replicated {
                            holders.push(request.replica_worker);
                        }
                        proto::BlockMeta {
                            index: b.index as u32,
                            rows: b.num_rows() as u64,
                            bytes: b
                                .batches
                                .iter()
                                .map(|x| x.get_array_memory_size() as u64)
                                .sum(),
                            holders,
                        }
                    })
                    .collect();
            }
            Err(e) => {
                warn!(source = %name, error = %e, "source failed and stopped");
                out.failure = e.to_string();
                failed.push((name.clone(), *split));
            }
        }
        sealed_sources.push(out);
    }
    for key in failed {
        receivers.remove(&key);
    }
    sealed_sources
}

/// Gives the replica worker at `address` (none if empty) the `blocks` of one seal: their
/// `lineage` for a replayable source, copies of their rows otherwise. Says which
/// blocks it now holds.
async fn replicate(
    peers: &Arc<FlightPeers>,
    address: &str,
    blocks: &[Arc<crate::block::Block>],
    lineage: Option<proto::BlockLineage>,
) -> Vec<bool> {
    let mut replicated = vec![false; blocks.len()];
    let Some(first) = blocks.first() else {
        return replicated;
    };
    if address.is_empty() {
        return replicated;
    }
    let (source, interval) = (&first.source, first.interval);
    if let Some(lineage) = lineage {
        let empty = Arc::new(arrow::datatypes::Schema::empty());
        match peers
            .put(address, Kind::Lineage(lineage), empty, Vec::new())
            .await
        {
            Ok(()) => replicated.fill(true),
            Err(e) => {
                warn!(%source, %interval, error = %e, "could not replicate the lineage of blocks")
            }
        }
        return replicated;
    }
    let mut puts = JoinSet::new();
    for (i, block) in blocks.iter().enumerate() {
        let put = put_replica(peers, address.to_string(), block.clone());
        puts.spawn(async move { put.await.map(|()| i) });
    }
    while let Some(joined) = puts.join_next().await {
        match joined {
            Ok(Ok(index)) => {
                if let Some(r) = replicated.get_mut(index) {
                    *r = true;
                }
            }
            Ok(Err(e)) => {
                warn!(%source, %interval, error = %e, "could not replicate a block")
            }
            Err(e) => warn!(%source, error = %e, "replication task failed"),
        }
    }
    replicated
}

fn put_replica(
    peers: &Arc<FlightPeers>,
    address: String,
    block: Arc<crate::block::Block>,
) -> impl std::future::Future<Output = Result<()>> + Send + 'static {
    let peers = peers.clone();
    async move {
        let kind = Kind::Block(proto::BlockRef {
            source: block.source.clone(),
            interval: block.interval.0,
            index: block.index as u32,
        });
        // The `_interval` column (last) is the interval's start on every row: the
        // replica adds it back instead of receiving it.
        let records: Vec<usize> = (0..block.schema.fields().len().saturating_sub(1)).collect();
        let schema = Arc::new(block.schema.project(&records)?);
        let batches = block
            .batches
            .iter()
            .map(|b| b.project(&records))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        peers.put(&address, kind, schema, batches).await?;
        Ok(())
    }
}

async fn installed_view(state: &WorkerState, view: &str) -> Result<InstalledView> {
    state
        .installed
        .lock()
        .await
        .as_ref()
        .and_then(|i| i.views.get(view).cloned())
        .ok_or_else(|| Error::Internal(format!("view {view} is not installed on this worker")))
}

/// What a reduce task reads before it computes: its shuffle pieces (local ones
/// shared, remote ones fetched all at once) and, for a speculative copy, the committed
/// partition it starts from.
struct ReduceInputs {
    pieces: Vec<ShufflePiece>,
    adopted: Option<PartitionSlot>,
    /// Bytes fetched from other workers.
    bytes_read: u64,
}

/// A worker's address and an interval: where one fetch of pieces reads.
type FetchFrom<'a> = (&'a str, IntervalId);

/// Reads a reduce task's inputs (`None` for other tasks).
async fn read_inputs(
    state: &WorkerState,
    peers: &FlightPeers,
    task: &proto::Task,
) -> Result<Option<ReduceInputs>> {
    let Some(TaskKind::Reduce(reduce)) = &task.kind else {
        return Ok(None);
    };
    let interval = IntervalId(task.interval);
    let p = reduce.partition;
    // Local pieces are read in place; the others are fetched with one request per
    // worker that holds some, all at once. They stay in the order given (block
    // order), so that every run of the task folds them alike.
    let mut pieces: Vec<Option<ShufflePiece>> = vec![None; reduce.pieces.len()];
    // By (address, interval) of the pieces: the pieces each fetch reads.
    let mut remote: Vec<(FetchFrom, Vec<(usize, &proto::PieceLocation)>)> = Vec::new();
    for ((i, location), slot) in reduce.pieces.iter().enumerate().zip(&mut pieces) {
        let of = location.interval.map_or(interval, IntervalId);
        if location.worker == state.id() {
            let key = (task.view.clone(), of, location.block);
            let local = state.shuffle.get(&key).ok_or_else(|| {
                Error::Internal(format!(
                    "map output of block {} of interval {of} is missing",
                    location.block
                ))
            })?;
            *slot = Some(local.get(p as usize).cloned().unwrap_or_default());
        } else {
            let at = (location.address.as_str(), of);
            match remote.iter_mut().find(|(a, _)| *a == at) {
                Some((_, held)) => held.push((i, location)),
                None => remote.push((at, vec![(i, location)])),
            }
        }
    }
    let fetched = futures::future::try_join_all(
        remote
            .iter()
            .map(|((address, of), held)| fetch_pieces(peers, &task.view, *of, p, address, held)),
    )
    .await?;
    let mut bytes_read: u64 = 0;
    for ((_, held), fetched) in remote.iter().zip(fetched) {
        for ((i, _), piece) in held.iter().zip(fetched) {
            bytes_read = bytes_read.saturating_add(piece_bytes(&piece));
            let slot = pieces
                .get_mut(*i)
                .ok_or_else(|| Error::Internal(format!("no piece {i} to fetch")))?;
            *slot = Some(piece);
        }
    }
    let pieces = pieces
        .into_iter()
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| Error::Internal("a fetch returned fewer pieces than asked".into()))?;
    let adopted = match &reduce.adopt {
        Some(adopt) => {
            let description = adopt.description.clone().ok_or_else(|| {
                Error::Internal("a speculative reduce task without a description".into())
            })?;
            let (slot, bytes) =
                handover::fetch_partition(peers, &adopt.from_address, description).await?;
            bytes_read = bytes_read.saturating_add(bytes);
            Some(slot)
        }
        None => None,
    };
    Ok(Some(ReduceInputs {
        pieces,
        adopted,
        bytes_read,
    }))
}

async fn run_task(
    state: &Arc<WorkerState>,
    task: proto::Task,
    inputs: Option<ReduceInputs>,
    abandon: &tokio_util::sync::CancellationToken,
) -> Result<proto::TaskResult> {
    let interval = IntervalId(task.interval);
    let view = installed_view(state, &task.view).await?;
    match task.kind {
        Some(TaskKind::Map(map)) => {
            let block = state
                .block(&map.source, interval, map.block)?
                .ok_or_else(|| {
                    Error::Internal(format!(
                        "block {} of {} interval {interval} is not held by this worker",
                        map.block, map.source
                    ))
                })?;
            let wanted = Wanted::from_list(map.partitions);
            let pieces = view
                .operators
                .map
                .map_block(&state.task_ctx, &block, &wanted)
                .await?;
            let partition_rows = pieces.iter().map(piece_rows).collect();
            let components = pieces
                .first()
                .map_or(1, |p| (p.distinct.len() as u32).saturating_add(1));
            // An abandoned run (a copy that lost, or one of a cancelled interval)
            // leaves nothing a newer run of the block's map could be mistaken for.
            if abandon.is_cancelled() {
                return Err(Error::Internal(format!("task {} was abandoned", task.id)));
            }
            let piece = crate::shuffle::piece_id(map.input, map.block)?;
            state
                .shuffle
                .put((task.view.clone(), interval, piece), pieces);
            Ok(proto::TaskResult {
                partition_rows,
                components,
                ..Default::default()
            })
        }
        Some(TaskKind::Reduce(reduce)) => {
            let p = reduce.partition;
            let ReduceInputs {
                pieces,
                adopted,
                bytes_read,
            } = inputs.ok_or_else(|| Error::Internal("a reduce task without its inputs".into()))?;
            let prior = match &adopted {
                Some(slot) => slot.state.clone(),
                None => state.partitions.state(&task.view, p),
            };
            let rows = match &adopted {
                Some(slot) => slot.current_rows(),
                None => state.partitions.current_rows(&task.view, p),
            };
            let input = PartitionInput {
                interval,
                state: prior,
                pieces,
                rows,
                watermark: reduce.watermark,
            };
            let output = view
                .operators
                .reduce
                .process_interval(&state.task_ctx, input)
                .await?;
            let schema = &view.plan.schema;
            let update = match output.view {
                ViewUpdate::Replace(rows) => ViewUpdate::Replace(conform(schema, rows)?),
                ViewUpdate::Append(rows) => ViewUpdate::Append(conform(schema, rows)?),
            };
            let deletes = conform(schema, output.changelog.deletes)?;
            let inserts = conform(schema, output.changelog.inserts)?;
            let changed = deletes.iter().chain(&inserts);
            let changed_rows: u64 = changed.clone().map(|b| b.num_rows() as u64).sum();
            let changed_bytes: u64 = changed.map(|b| b.get_array_memory_size() as u64).sum();
            if reduce.keep_changes && changed_rows > 0 {
                state.blocks.put(Arc::new(Block {
                    source: task.view.clone(),
                    interval,
                    index: p as usize,
                    schema: schema.clone(),
                    batches: inserts.clone(),
                    deletes: deletes.clone(),
                }));
            }
            // A replay rebuilds state only: its changelog went out when the interval
            // first ran.
            let (deletes, inserts) = if reduce.replay || reduce.withhold_changes {
                (Vec::new(), Vec::new())
            } else {
                (deletes, inserts)
            };
            let (view_rows, view_bytes) = match &update {
                ViewUpdate::Replace(rows) => (rows_of(rows), bytes_of(rows)),
                ViewUpdate::Append(rows) => {
                    let before = adopted.as_ref().map_or_else(
                        || state.partitions.current_rows(&task.view, p),
                        |s| s.current_rows(),
                    );
                    (
                        rows_of(&before).saturating_add(rows_of(rows)),
                        bytes_of(&before).saturating_add(bytes_of(rows)),
                    )
                }
            };
            let state_bytes = output
                .state
                .tables
                .values()
                .map(|t| bytes_of(t))
                .fold(view_bytes, u64::saturating_add);
            if !state.partitions.set_pending(
                (&task.view, p),
                interval,
                (output.state, update),
                adopted,
                abandon,
            ) {
                return Err(Error::Internal(format!("task {} was abandoned", task.id)));
            }
            Ok(proto::TaskResult {
                view_rows,
                state_bytes,
                changed_rows,
                changed_bytes,
                deletes: ipc_bytes(schema, &deletes)?,
                inserts: ipc_bytes(schema, &inserts)?,
                shuffle_bytes_read: bytes_read,
                ..Default::default()
            })
        }
        None => Err(Error::Internal("a task without a kind".into())),
    }
}

/// How many rows `batches` hold.
fn rows_of(batches: &[RecordBatch]) -> u64 {
    batches.iter().map(|b| b.num_rows() as u64).sum()
}

/// The memory `batches` take, as Arrow counts it (buffers shared between batches are
/// counted once per batch: an estimate).
fn bytes_of(batches: &[RecordBatch]) -> u64 {
    batches
        .iter()
        .map(|b| b.get_array_memory_size() as u64)
        .sum()
}

/// Fetches from the worker at `address` the pieces for partition `partition` of the
/// map outputs it holds (`held`), in `held`'s order: one request per component,
/// each answering with as many pieces as asked ([`FlightPeers::fetch_pieces`]).
async fn fetch_pieces(
    peers: &FlightPeers,
    view: &str,
    interval: IntervalId,
    partition: u32,
    address: &str,
    held: &[(usize, &proto::PieceLocation)],
) -> Result<Vec<ShufflePiece>> {
    let components = held.iter().map(|(_, l)| l.components).max().unwrap_or(1);
    let blocks: Vec<u32> = held.iter().map(|(_, l)| l.block).collect();
    let Some((&block, more_blocks)) = blocks.split_first() else {
        return Ok(Vec::new());
    };
    let fetches = (0..components.max(1)).map(|component| {
        let shuffle = proto::ShuffleRef {
            view: view.to_string(),
            interval: interval.0,
            block,
            partition,
            component,
            more_blocks: more_blocks.to_vec(),
        };
        peers.fetch_pieces(address, shuffle)
    });
    let mut by_component = futures::future::try_join_all(fetches).await?.into_iter();
    let rows = by_component.next().unwrap_or_default();
    let mut distinct: Vec<_> = by_component.map(Vec::into_iter).collect();
    Ok(rows
        .into_iter()
        .map(|rows| ShufflePiece {
            rows,
            distinct: distinct
                .iter_mut()
                .map(|d| d.next().unwrap_or_default())
                .collect(),
        })
        .collect())
}

fn piece_rows(piece: &ShufflePiece) -> u64 {
    piece
        .rows
        .iter()
        .chain(piece.distinct.iter().flatten())
        .map(|b| b.num_rows() as u64)
        .sum()
}

fn piece_bytes(piece: &ShufflePiece) -> u64 {
    piece
        .rows
        .iter()
        .chain(piece.distinct.iter().flatten())
        .map(|b| b.get_array_memory_size() as u64)
        .sum()
}
