//! [`WorkerClient`]: the typed client the coordinator calls a worker through, one
//! method per call of the `Worker` service, each answering with the message itself.

use tonic::transport::Channel;
use tonic::{Status, Streaming};

use super::proto::{self, worker_client::WorkerClient as Generated};
use super::{MAX_MESSAGE_BYTES, channel};
use crate::error::Result;

/// A connection to one worker's control plane; cheap to clone, and every method
/// takes `&self`, so calls to one worker run concurrently.
#[derive(Clone, Debug)]
pub struct WorkerClient(Generated<Channel>);

impl WorkerClient {
    /// A client of the worker at `address` (`http://host:port`); it connects on the
    /// first call.
    pub fn connect_lazy(address: &str) -> Result<Self> {
        Ok(WorkerClient(
            Generated::new(channel(address)?)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        ))
    }

    /// Runs map and reduce tasks; their results stream back as they finish.
    pub async fn run_tasks(
        &self,
        request: proto::RunTasksRequest,
    ) -> Result<Streaming<proto::TaskResult>, Status> {
        Ok(self.0.clone().run_tasks(request).await?.into_inner())
    }

    /// Installs catalog objects (and where receivers run) as of a catalog version.
    pub async fn install(
        &self,
        request: proto::InstallRequest,
    ) -> Result<proto::InstallResponse, Status> {
        Ok(self.0.clone().install(request).await?.into_inner())
    }

    /// Removes dropped catalog objects and what the worker holds of them.
    pub async fn remove(
        &self,
        request: proto::RemoveRequest,
    ) -> Result<proto::RemoveResponse, Status> {
        Ok(self.0.clone().remove(request).await?.into_inner())
    }

    /// Seals an interval on the worker's receivers; its blocks are replicated before the answer.
    pub async fn seal(&self, request: proto::SealRequest) -> Result<proto::SealResponse, Status> {
        Ok(self.0.clone().seal(request).await?.into_inner())
    }

    /// Abandons tasks whose copy won elsewhere, and drops partitions that moved.
    pub async fn abandon(
        &self,
        request: proto::AbandonRequest,
    ) -> Result<proto::AbandonResponse, Status> {
        Ok(self.0.clone().abandon(request).await?.into_inner())
    }

    /// Commits an interval's outputs (and starts a checkpoint, if asked).
    pub async fn commit(
        &self,
        request: proto::CommitRequest,
    ) -> Result<proto::CommitResponse, Status> {
        Ok(self.0.clone().commit(request).await?.into_inner())
    }

    /// Waits for a checkpoint started by a commit to be written.
    pub async fn await_checkpoint(
        &self,
        request: proto::AwaitCheckpointRequest,
    ) -> Result<proto::AwaitCheckpointResponse, Status> {
        Ok(self.0.clone().await_checkpoint(request).await?.into_inner())
    }

    /// Cancels an interval's tasks and drops their outputs.
    pub async fn cancel(
        &self,
        request: proto::CancelRequest,
    ) -> Result<proto::CancelResponse, Status> {
        Ok(self.0.clone().cancel(request).await?.into_inner())
    }

    /// What the worker is doing; also a liveness probe.
    pub async fn status(
        &self,
        request: proto::StatusRequest,
    ) -> Result<proto::StatusResponse, Status> {
        Ok(self.0.clone().status(request).await?.into_inner())
    }

    /// Stops a receiver, giving back where it stood and its unsealed records.
    pub async fn release_receiver(
        &self,
        request: proto::ReleaseReceiverRequest,
    ) -> Result<proto::ReceiverHandover, Status> {
        Ok(self.0.clone().release_receiver(request).await?.into_inner())
    }

    /// Opens a receiver where another one stood.
    pub async fn adopt_receiver(
        &self,
        request: proto::ReceiverHandover,
    ) -> Result<proto::AdoptReceiverResponse, Status> {
        Ok(self.0.clone().adopt_receiver(request).await?.into_inner())
    }

    /// How to fetch a state partition from this worker.
    pub async fn describe_partition(
        &self,
        request: proto::DescribePartitionRequest,
    ) -> Result<proto::PartitionDescription, Status> {
        Ok(self
            .0
            .clone()
            .describe_partition(request)
            .await?
            .into_inner())
    }

    /// Fetches a state partition from the worker that has it.
    pub async fn adopt_partition(
        &self,
        request: proto::AdoptPartitionRequest,
    ) -> Result<proto::AdoptPartitionResponse, Status> {
        Ok(self.0.clone().adopt_partition(request).await?.into_inner())
    }

    /// Forgets a state partition that moved away.
    pub async fn drop_partition(
        &self,
        request: proto::DescribePartitionRequest,
    ) -> Result<proto::DropPartitionResponse, Status> {
        Ok(self.0.clone().drop_partition(request).await?.into_inner())
    }

    /// Loads a state partition from a checkpoint (or empties it).
    pub async fn restore_partition(
        &self,
        request: proto::RestorePartitionRequest,
    ) -> Result<proto::RestorePartitionResponse, Status> {
        Ok(self
            .0
            .clone()
            .restore_partition(request)
            .await?
            .into_inner())
    }
}
