//! Handing a leaving worker's work over to the workers that stay.
//!
//! A worker that leaves cleanly (`dstream worker` stopped with Ctrl-C or SIGTERM) asks
//! the coordinator to let it go and serves on meanwhile. Between two intervals —
//! under the engine's state lock, so no interval runs meanwhile — [`hand_over_leaving`]
//! moves everything the worker holds:
//! - each receiver goes to the staying worker with the fewest receivers; it carries on
//!   where the leaving one stood (counters, watermark, files read, unsealed input);
//! - each state partition goes to the staying worker with the fewest partitions, which
//!   fetches it from the leaving worker over Flight, with the kept versions of its
//!   view rows;
//! - retained input blocks are kept by their replicas; the leaving worker is dropped
//!   from their holders.
//!
//! Then the worker is marked *left* and its `Leave` call answers. Something that
//! cannot be moved (no worker stays, or a move fails) stops the view or source that
//! needed it, with a message saying why, as a dead worker would.
//!
//! The same moves even the load out when a worker joins (or a replacement for a
//! dead one starts): [`rebalance`] moves state partitions from the workers with the
//! most to those with the fewest until no two differ by more than one; the worker
//! that gave a partition away then drops it.

use std::collections::HashMap;
use std::time::Instant;

use dstream_executor::rpc::proto;
use futures::future::join_all;
use tracing::{info, warn};

use super::{Cluster, WorkerRecord, scheduler};
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::state::{EngineState, Load};

/// Hands over the work of every leaving worker, then marks it left.
pub async fn hand_over_leaving(engine: &Engine, state: &mut EngineState) {
    let cluster = engine.inner.cluster.clone();
    let leaving = cluster.leaving();
    if leaving.is_empty() {
        return;
    }
    // Workers that stay need the catalog before they adopt anything.
    if let Err(e) = scheduler::sync_workers(engine, state).await {
        warn!(error = %e, "could not install the catalog on every worker before a handover");
    }
    for worker in leaving {
        let handed_over = hand_over(&cluster, state, &worker).await;
        cluster.set_left(worker.id, handed_over);
    }
    engine.publish_snapshot(state);
}

/// Evens out the state partitions of running views over the live workers, moving
/// partitions from the busiest workers to the idlest ones. Returns false if a live
/// worker could not take part (its catalog is not installed yet): evening out is
/// then worth trying again.
pub async fn rebalance(engine: &Engine, state: &mut EngineState) -> bool {
    let cluster = engine.inner.cluster.clone();
    let live = cluster.alive();
    let ready = live.len();
    let alive: Vec<WorkerRecord> = live
        .into_iter()
        .filter(|w| w.installed >= state.catalog_version)
        .collect();
    let complete = alive.len() == ready;
    if alive.len() < 2 {
        return complete;
    }
    let mut owned: HashMap<u64, Vec<(String, u32)>> =
        alive.iter().map(|w| (w.id, Vec::new())).collect();
    for (name, view) in state.views.iter().filter(|(_, v)| v.failure.is_none()) {
        for (p, owner) in view.placement.iter() {
            if let Some(partitions) = owned.get_mut(&owner) {
                partitions.push((name.clone(), p));
            }
        }
    }
    let mut moves = Vec::new();
    loop {
        let busiest = owned
            .iter()
            .max_by_key(|(id, p)| (p.len(), std::cmp::Reverse(**id)))
            .map(|(id, p)| (*id, p.len()));
        let idlest = owned
            .iter()
            .min_by_key(|(id, p)| (p.len(), **id))
            .map(|(id, p)| (*id, p.len()));
        let (Some((from, most)), Some((to, fewest))) = (busiest, idlest) else {
            break;
        };
        if most <= fewest.saturating_add(1) {
            break;
        }
        let Some((view, p)) = owned.get_mut(&from).and_then(Vec::pop) else {
            break;
        };
        owned.entry(to).or_default().push((view.clone(), p));
        moves.push((view, p, from, to));
    }
    if moves.is_empty() {
        return complete;
    }
    let started = Instant::now();
    let planned = moves.len();
    let results = join_all(moves.into_iter().map(|(view, p, from, to)| {
        let cluster = &cluster;
        let ran = state
            .views
            .get(&view)
            .is_some_and(|v| v.last_interval.is_some());
        async move {
            let moved = match (cluster.get(from), cluster.get(to)) {
                // A view that has not run has nothing to move yet.
                _ if !ran => Ok(0),
                (Some(from), Some(to)) => move_partition(cluster, &from, &to, &view, p).await,
                _ => Err(Error::WorkerLost("a worker left meanwhile".into())),
            };
            (view, p, from, to, moved)
        }
    }))
    .await;
    let (mut moved, mut bytes) = (0u32, 0u64);
    let mut drops = Vec::new();
    for (name, p, from, to, result) in results {
        match result {
            Ok(size) => {
                if let Some(view) = state.views.get_mut(&name) {
                    view.placement.move_to(p, to);
                }
                moved = moved.saturating_add(1);
                bytes = bytes.saturating_add(size);
                drops.push((name, p, from));
            }
            Err(e) => {
                warn!(view = %name, partition = p, from, to, error = %e, "could not move a state partition to even the load; it stays")
            }
        }
    }
    engine.publish_snapshot(state);
    // The old owners forget what moved.
    let drops = drops.into_iter().map(|(view, partition, from)| {
        let cluster = &cluster;
        async move {
            let Some(worker) = cluster.get(from) else {
                return;
            };
            let request = proto::DescribePartitionRequest {
                view: view.clone(),
                partition,
            };
            if let Err(e) = cluster
                .call(from, "drop a moved partition", worker.client.drop_partition(request))
                .await
            {
                warn!(view = %view, partition, worker = from, error = %e, "could not drop a moved partition");
            }
        }
    });
    join_all(drops).await;
    info!(
        partitions = moved,
        planned,
        bytes,
        elapsed = ?started.elapsed(),
        "evened out state partitions over the workers"
    );
    complete
}

/// Moves `leaving`'s receivers and state partitions; true if everything moved.
async fn hand_over(cluster: &Cluster, state: &mut EngineState, leaving: &WorkerRecord) -> bool {
    let staying = cluster.alive();
    let started = Instant::now();
    let mut complete = true;

    // Receivers, one by one: each is small.
    let staying_ids: Vec<u64> = staying.iter().map(|w| w.id).collect();
    let mut receivers = Load::new(
        staying_ids.iter().copied(),
        state.sources.values().map(|s| &s.receivers),
    );
    let mut moved_receivers: u32 = 0;
    for (name, slot) in state.sources.iter_mut() {
        if slot.failure.is_some() {
            continue;
        }
        let splits: Vec<u32> = slot.receivers.on(leaving.id).collect();
        for split in splits {
            let target = receivers
                .pick()
                .and_then(|id| staying.iter().find(|w| w.id == id));
            let moved = match target {
                Some(target) => move_receiver(cluster, leaving, target, name, split)
                    .await
                    .map(|()| target.id),
                None => Err(Error::WorkerLost("no other worker is left".into())),
            };
            match moved {
                Ok(target) => {
                    slot.receivers.move_to(split, target);
                    moved_receivers = moved_receivers.saturating_add(1);
                }
                Err(e) => {
                    warn!(source = %name, split, error = %e, "could not move a receiver off a leaving worker");
                    slot.failure = Some(format!(
                        "its receiver could not be moved off {}, which left: {e}",
                        leaving.describe()
                    ));
                    complete = false;
                    break;
                }
            }
        }
    }
    // Retained blocks stay readable on their replicas.
    for slot in state.sources.values_mut() {
        for sealed in slot.retained.iter_mut() {
            for block in &mut sealed.blocks {
                block.holders.retain(|h| *h != leaving.id);
            }
        }
    }
    // So do the blocks of an interval sealed ahead.
    for sealed in state
        .sealed_ahead
        .iter_mut()
        .flat_map(|a| a.splits.values_mut())
    {
        for block in &mut sealed.blocks {
            block.holders.retain(|h| *h != leaving.id);
        }
    }

    // State partitions, all at once: each is fetched by its new owner.
    let mut owned = Load::new(
        staying_ids.iter().copied(),
        state.views.values().map(|v| &v.placement),
    );
    let mut moves = Vec::new();
    for (name, view) in &state.views {
        if view.failure.is_some() {
            continue;
        }
        for p in view.placement.on(leaving.id) {
            let target = owned
                .pick()
                .and_then(|id| staying.iter().find(|w| w.id == id));
            moves.push((name.clone(), p, target.cloned()));
        }
    }
    let results = join_all(moves.into_iter().map(|(view, p, target)| async move {
        let moved = match &target {
            Some(target) => move_partition(cluster, leaving, target, &view, p).await,
            None => Err(Error::WorkerLost("no other worker is left".into())),
        };
        (view, p, target.map(|t| t.id), moved)
    }))
    .await;
    let (mut moved_partitions, mut moved_bytes) = (0u32, 0u64);
    for (name, p, target, moved) in results {
        let Some(view) = state.views.get_mut(&name) else {
            continue;
        };
        match (moved, target) {
            (Ok(bytes), Some(target)) => {
                view.placement.move_to(p, target);
                moved_partitions = moved_partitions.saturating_add(1);
                moved_bytes = moved_bytes.saturating_add(bytes);
            }
            (Err(e), _) => {
                complete = false;
                warn!(view = %name, partition = p, error = %e, "could not move a state partition off a leaving worker");
                if view.failure.is_none() {
                    view.failure = Some(format!(
                        "its state partition {p} could not be moved off {}, which left: {e}",
                        leaving.describe()
                    ));
                }
            }
            (Ok(_), None) => complete = false,
        }
    }
    info!(
        worker = leaving.id,
        receivers = moved_receivers,
        partitions = moved_partitions,
        bytes = moved_bytes,
        elapsed = ?started.elapsed(),
        "handed a leaving worker's work over"
    );
    complete
}

async fn move_receiver(
    cluster: &Cluster,
    from: &WorkerRecord,
    to: &WorkerRecord,
    source: &str,
    split: u32,
) -> Result<()> {
    let released = cluster
        .call(
            from.id,
            "release a receiver",
            from.client.release_receiver(proto::ReleaseReceiverRequest {
                source: source.to_string(),
                split,
            }),
        )
        .await?;
    cluster
        .call(
            to.id,
            "adopt a receiver",
            to.client.adopt_receiver(released),
        )
        .await?;
    info!(
        source,
        split,
        from = from.id,
        to = to.id,
        "moved a receiver"
    );
    Ok(())
}

async fn move_partition(
    cluster: &Cluster,
    from: &WorkerRecord,
    to: &WorkerRecord,
    view: &str,
    partition: u32,
) -> Result<u64> {
    let request = adopt_request(cluster, from, view, partition).await?;
    let adopted = cluster
        .call(
            to.id,
            "adopt a state partition",
            to.client.adopt_partition(request),
        )
        .await?;
    Ok(adopted.bytes)
}

/// What another worker needs to fetch partition `partition` of `view` from `from`
/// over Flight: `from`'s description of it.
pub(crate) async fn adopt_request(
    cluster: &Cluster,
    from: &WorkerRecord,
    view: &str,
    partition: u32,
) -> Result<proto::AdoptPartitionRequest> {
    let description = cluster
        .call(
            from.id,
            "describe a state partition",
            from.client
                .describe_partition(proto::DescribePartitionRequest {
                    view: view.to_string(),
                    partition,
                }),
        )
        .await?;
    Ok(proto::AdoptPartitionRequest {
        from_address: from.address.clone(),
        description: Some(description),
    })
}
