//! Handing work over when a worker leaves cleanly.
//!
//! The coordinator moves a leaving worker's receivers and state partitions to other
//! workers between two intervals:
//! - a receiver is *released* on the leaving worker, which stops reading and reports
//!   where it stood ([`release_receiver`]), and *adopted* by another worker, which
//!   opens it and carries on from there ([`adopt_receiver`]);
//! - a state partition is *described* by the leaving worker ([`describe_partition`]:
//!   its shape, without data) and *adopted* by another worker, which fetches every
//!   part of it from the leaving worker over Flight ([`adopt_partition`]): the
//!   accumulators, the distinct pairs, the sliding-window running values, and every
//!   kept version of the view rows, so ad-hoc reads of older snapshots still work.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::RecordBatch;
use dstream_storage::IntervalId;
use tracing::info;

use super::state::{PartitionSlot, WorkerState};
use crate::connector::{ReceiverPosition, ReceiverStats, Split};
use crate::error::{Error, Result};
use crate::ingest::{SourceHandover, SourceRuntime};
use crate::operator::StatePartition;
use crate::rpc::FlightPeers;
use crate::rpc::proto::{self, data_ticket::Kind, partition_state_ref::Part};

/// Stops receiver `split` of `source` on this worker and says where it stood.
pub async fn release_receiver(
    state: &WorkerState,
    source: &str,
    split: u32,
) -> Result<proto::ReceiverHandover> {
    let mut runtime = state
        .receivers
        .lock()
        .await
        .remove(&(source.to_string(), split))
        .ok_or_else(|| Error::Internal(format!("no receiver {split} of source {source} here")))?;
    let handover = runtime.release();
    info!(source, split, "released receiver");
    Ok(proto::ReceiverHandover {
        source: source.to_string(),
        split,
        splits: runtime.split().count,
        records: handover.position.stats.records,
        malformed: handover.position.stats.malformed,
        late_rows: handover.late_rows,
        watermark: handover.watermark,
        seen_files: handover.position.seen_files,
        pending: handover.position.pending,
    })
}

/// Opens the receiver of a released source on this worker, where it stood.
pub async fn adopt_receiver(state: &WorkerState, handover: proto::ReceiverHandover) -> Result<()> {
    let (def, block_rows) = {
        let installed = state.installed.lock().await;
        let installed = installed
            .as_ref()
            .ok_or_else(|| Error::Internal("adopting a receiver before install".into()))?;
        let def = installed
            .catalog
            .source(&handover.source)
            .cloned()
            .ok_or_else(|| {
                Error::Internal(format!(
                    "adopting the receiver of unknown source {}",
                    handover.source
                ))
            })?;
        (def, installed.block_rows)
    };
    let split = Split {
        index: handover.split,
        count: handover.splits.max(1),
    };
    let mut runtime = SourceRuntime::open(def, &state.task_ctx, block_rows, split)?;
    runtime.resume(SourceHandover {
        position: ReceiverPosition {
            stats: ReceiverStats {
                records: handover.records,
                malformed: handover.malformed,
            },
            seen_files: handover.seen_files,
            pending: handover.pending,
        },
        watermark: handover.watermark,
        late_rows: handover.late_rows,
    });
    info!(source = %handover.source, split = handover.split, "adopted receiver");
    state
        .receivers
        .lock()
        .await
        .insert((handover.source, handover.split), runtime);
    Ok(())
}

/// The shape of a state partition held here: what [`adopt_partition`] fetches.
pub fn describe_partition(
    state: &WorkerState,
    view: &str,
    partition: u32,
) -> proto::PartitionDescription {
    let described = state
        .partitions
        .with(view, partition, |slot| proto::PartitionDescription {
            view: view.to_string(),
            partition,
            present: true,
            tables: slot.state.tables.keys().cloned().collect(),
            emitted_until: slot.state.emitted_until,
            watermark: slot.state.watermark,
            versions: slot.versions.keys().map(|i| i.0).collect(),
            expired: slot.expired,
        });
    described.unwrap_or_else(|| proto::PartitionDescription {
        view: view.to_string(),
        partition,
        ..Default::default()
    })
}

/// One part of a state partition, for a Flight read by the adopting worker.
pub fn partition_part(
    state: &WorkerState,
    part: &proto::PartitionStateRef,
) -> Option<Vec<RecordBatch>> {
    state
        .partitions
        .with(&part.view, part.partition, |slot| match part.part() {
            Part::Table => slot.state.tables.get(&part.table).cloned(),
            Part::Version => slot
                .versions
                .get(&IntervalId(part.index))
                .map(|rows| rows.as_ref().clone()),
        })
        .flatten()
}

/// Fetches a described partition from the worker at `from` over Flight and makes it
/// this worker's. Returns the bytes fetched.
pub async fn adopt_partition(
    state: &WorkerState,
    peers: &FlightPeers,
    from: &str,
    description: proto::PartitionDescription,
) -> Result<u64> {
    let (view, partition) = (description.view.clone(), description.partition);
    let (slot, bytes) = fetch_partition(peers, from, description).await?;
    state.partitions.adopt(&view, partition, slot);
    info!(view = %view, partition, bytes, from, "adopted state partition");
    Ok(bytes)
}

/// Fetches a described partition from the worker at `from` over Flight: every part
/// of its state and every kept version of its view rows. Returns it with the bytes
/// fetched.
pub async fn fetch_partition(
    peers: &FlightPeers,
    from: &str,
    description: proto::PartitionDescription,
) -> Result<(PartitionSlot, u64)> {
    if !description.present {
        return Ok((PartitionSlot::default(), 0));
    }
    let view = description.view.clone();
    let partition = description.partition;
    let fetch = |part: Part, index: u64, table: &str| {
        let kind = Kind::PartitionState(proto::PartitionStateRef {
            view: view.clone(),
            partition,
            part: part as i32,
            index,
            table: table.to_string(),
        });
        peers.fetch(from, kind)
    };
    let mut bytes = 0u64;
    let mut count = |batches: &[RecordBatch]| {
        bytes = bytes.saturating_add(
            batches
                .iter()
                .map(|b| b.get_array_memory_size() as u64)
                .sum::<u64>(),
        );
    };
    let mut tables = BTreeMap::new();
    for table in &description.tables {
        let rows = fetch(Part::Table, 0, table).await?;
        count(&rows);
        tables.insert(table.clone(), rows);
    }
    let mut versions = BTreeMap::new();
    for &interval in &description.versions {
        let rows = fetch(Part::Version, interval, "").await?;
        count(&rows);
        versions.insert(IntervalId(interval), Arc::new(rows));
    }
    let slot = PartitionSlot {
        state: Arc::new(StatePartition {
            tables,
            emitted_until: description.emitted_until,
            watermark: description.watermark,
        }),
        versions,
        expired: description.expired,
        pending: None,
    };
    Ok((slot, bytes))
}
