//! Ad-hoc reads over Flight: a view's partitions and a source's retained blocks,
//! fetched from the workers that hold them as of the reader's snapshot.
//!
//! [`RemoteView`] and [`RemoteSource`] are DataFusion table providers registered in a
//! query's context; they fetch only when the query scans them, all partitions at once,
//! and fail with a message naming the worker when one is gone. A partition that
//! moved since the snapshot fails the read with [`read_moved`] true: the query runs
//! again over a newer snapshot.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use datafusion::catalog::{MemTable, Session, TableProvider};
use datafusion::common::DataFusionError;
use datafusion::datasource::TableType;
use datafusion::logical_expr::Expr;
use datafusion::physical_plan::ExecutionPlan;
use dstream_executor::rpc::proto::{self, data_ticket::Kind};
use dstream_storage::IntervalId;
use futures::future::try_join_all;

use super::Cluster;
use crate::state::{BlockInfo, Placement};

/// The rows of one view as of one interval, partition by partition on its workers.
#[derive(Debug)]
pub struct RemoteView {
    pub cluster: Arc<Cluster>,
    pub name: String,
    pub schema: SchemaRef,
    /// The worker of each partition.
    pub placement: Placement,
    pub interval: IntervalId,
}

impl RemoteView {
    /// Fetches every partition.
    pub async fn fetch(&self) -> Result<Vec<Vec<RecordBatch>>, DataFusionError> {
        let reads = self.placement.iter().map(|(p, worker)| {
            let cluster = self.cluster.clone();
            let kind = Kind::ViewRows(proto::ViewRowsRef {
                view: self.name.clone(),
                partition: p,
                interval: self.interval.0,
            });
            let name = self.name.clone();
            async move {
                let record = match cluster.get(worker) {
                    Some(w) if w.is_reachable() => w,
                    _ => {
                        return Err(lost(&format!(
                            "materialized view \"{name}\": partition {p} is on {}",
                            cluster.unavailable(worker)
                        )));
                    }
                };
                cluster
                    .peers
                    .fetch(&record.address, kind)
                    .await
                    .map_err(|e| {
                        let message = format!("materialized view \"{name}\": partition {p}: {e}");
                        match e {
                            // A newer snapshot reads it where it is now.
                            dstream_executor::Error::Moved(_) => moved(message),
                            _ => lost(&message),
                        }
                    })
            }
        });
        try_join_all(reads).await
    }
}

/// Scans fetched rows as an in-memory table.
pub(crate) async fn scan_fetched(
    schema: &SchemaRef,
    partitions: Vec<Vec<RecordBatch>>,
    state: &dyn Session,
    projection: Option<&Vec<usize>>,
    filters: &[Expr],
    limit: Option<usize>,
) -> Result<Arc<dyn ExecutionPlan>, DataFusionError> {
    MemTable::try_new(schema.clone(), partitions)?
        .scan(state, projection, filters, limit)
        .await
}

fn lost(message: &str) -> DataFusionError {
    DataFusionError::External(message.to_string().into())
}

fn moved(message: String) -> DataFusionError {
    DataFusionError::External(Box::new(dstream_executor::Error::Moved(message)))
}

/// Whether a query failed because rows it read moved or expired on their worker
/// after its snapshot was taken (see [`dstream_executor::Error::Moved`]): the same
/// query over a newer snapshot reads them.
pub fn read_moved(e: &DataFusionError) -> bool {
    match e.find_root() {
        DataFusionError::External(e) => matches!(
            e.downcast_ref::<dstream_executor::Error>(),
            Some(dstream_executor::Error::Moved(_))
        ),
        _ => false,
    }
}

#[async_trait]
impl TableProvider for RemoteView {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>, DataFusionError> {
        let mut partitions = self.fetch().await?;
        if partitions.is_empty() {
            // A view that has not run an interval yet: no rows.
            partitions.push(Vec::new());
        }
        scan_fetched(&self.schema, partitions, state, projection, filters, limit).await
    }
}

/// The retained input blocks of a source, read from live holders.
#[derive(Debug)]
pub struct RemoteSource {
    pub cluster: Arc<Cluster>,
    pub name: String,
    pub schema: SchemaRef,
    pub blocks: Vec<BlockInfo>,
}

impl RemoteSource {
    pub async fn fetch(&self) -> Result<Vec<RecordBatch>, DataFusionError> {
        // Read each block from a live holder, grouping the blocks by holder.
        let mut by_holder: BTreeMap<u64, Vec<proto::BlockRef>> = BTreeMap::new();
        for block in &self.blocks {
            let holder = block
                .holders
                .iter()
                .find(|h| self.cluster.is_reachable(**h))
                .ok_or_else(|| {
                    lost(&format!(
                        "source \"{}\": block {} of interval {} is on no live worker ({})",
                        self.name,
                        block.index,
                        block.interval,
                        block
                            .holders
                            .iter()
                            .map(|h| self.cluster.unavailable(*h))
                            .collect::<Vec<_>>()
                            .join("; ")
                    ))
                })?;
            by_holder.entry(*holder).or_default().push(proto::BlockRef {
                source: self.name.clone(),
                interval: block.interval.0,
                index: block.index,
            });
        }
        let reads = by_holder.into_iter().map(|(worker, blocks)| {
            let cluster = self.cluster.clone();
            let kind = Kind::SourceBlocks(proto::SourceBlocksRef {
                source: self.name.clone(),
                blocks,
            });
            let name = self.name.clone();
            async move {
                let address = cluster.get(worker).map(|w| w.address).unwrap_or_default();
                cluster
                    .peers
                    .fetch(&address, kind)
                    .await
                    .map_err(|e| lost(&format!("source \"{name}\": {e}")))
            }
        });
        Ok(try_join_all(reads).await?.into_iter().flatten().collect())
    }
}

#[async_trait]
impl TableProvider for RemoteSource {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>, DataFusionError> {
        let rows = self.fetch().await?;
        scan_fetched(&self.schema, vec![rows], state, projection, filters, limit).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_moved_partition_is_told_from_other_failed_reads_under_datafusion_wrappers() {
        let wrapped = |e: DataFusionError| e.context("while scanning").context("in a join");
        assert!(read_moved(&wrapped(moved("partition 0 moved".into()))));
        assert!(!read_moved(&wrapped(lost(
            "partition 0 is on a dead worker"
        ))));
        assert!(!read_moved(&DataFusionError::Execution(
            "division by zero".into()
        )));
        let error = crate::error::Error::DataFusion(wrapped(moved("partition 0 moved".into())));
        assert_eq!(error.sqlstate(), "40001");
    }
}
