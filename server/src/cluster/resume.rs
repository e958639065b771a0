//! Resuming after a restart: a coordinator that starts on a store holding committed
//! checkpoints carries on from the newest one.
//!
//! [`latest`] reads that checkpoint's manifest before the engine exists: the engine's
//! timeline continues the checkpointed one (same origin and width), and its next
//! interval is the one after the checkpoint. Once the catalog is restored — every
//! source has its receivers and every view its state partitions placed on the
//! workers — [`resume`]:
//! - reopens each source's receivers where the checkpoint left them (counters,
//!   watermark, files read);
//! - loads each view's state partitions from the checkpoint's files on the workers
//!   that own them, all at once.
//!
//! Then the intervals after the checkpoint run again from their input, so the views
//! end as a run without the restart would have: `generator` and `nexmark` records
//! are a function of the interval, and `file` sources read the files not read by the
//! checkpoint (a `tcp` source can only read what arrives from then on). Sources and
//! views created after the checkpoint start with the interval they first started
//! with (their `since`); one whose checkpointed definition differs (dropped and
//! created again) starts afresh. With the real clock, the intervals missed while the
//! server was down run back to back until it has caught up.

use std::sync::Arc;
use std::time::Duration;

use dstream_storage::checkpoint::Manifest;
use dstream_storage::{DataDir, IntervalId};
use futures::future::join_all;
use tracing::{info, warn};

use super::recovery::restore_request;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::state::{EngineState, SplitPosition};

/// The newest committed checkpoint of `data_dir`, to resume from; `None` if there is
/// none. A checkpoint that cannot be read, or was taken with another interval width,
/// is an error: starting without it would silently drop the views' state.
pub async fn latest(data_dir: &DataDir, width: Duration) -> Result<Option<Manifest>> {
    let manifest = Manifest::latest(data_dir).await.map_err(|e| {
        Error::Config(format!(
            "cannot read the latest checkpoint in {}: {e}; to start without it, move its manifest (manifests/) out of the store",
            data_dir.url()
        ))
    })?;
    match manifest {
        Some(m) if m.width_nanos != width.as_nanos() as i64 => Err(Error::Config(format!(
            "the latest checkpoint (interval {}) was taken with intervals of {:?}, but the server runs with {width:?}; to start without it, move its manifest (manifests/) out of the store",
            m.interval,
            Duration::from_nanos(m.width_nanos.max(0) as u64)
        ))),
        other => Ok(other),
    }
}

/// What a resume did, for the log.
#[derive(Debug, Default)]
struct Resumed {
    sources: usize,
    views: usize,
    partitions: usize,
    bytes: u64,
}

/// Reopens receivers and loads state partitions as of `manifest` (see the module
/// docs). What cannot be resumed stops with a message saying why; the rest goes on.
pub async fn resume(engine: &Engine, state: &mut EngineState, manifest: Arc<Manifest>) {
    let cluster = engine.cluster().clone();
    let at = IntervalId(manifest.interval);
    let mut resumed = Resumed::default();

    for (name, slot) in state.sources.iter_mut() {
        let sql = state.catalog.get(name).map(|o| o.sql().to_string());
        let Some(held) = manifest.sources.get(name).filter(|held| {
            slot.since.is_none_or(|s| s <= at)
                && (held.sql.is_empty() || Some(&held.sql) == sql.as_ref())
        }) else {
            continue;
        };
        slot.stats.receiver.records = held.records;
        slot.stats.receiver.malformed = held.malformed;
        slot.stats.late_rows = held.late_rows;
        slot.stats.watermark = held.watermark;
        // The counters are the source's: the first receiver carries them.
        slot.positions = (0..slot.receivers.len())
            .map(|split| SplitPosition {
                records: if split == 0 { held.records } else { 0 },
                malformed: if split == 0 { held.malformed } else { 0 },
                late_rows: if split == 0 { held.late_rows } else { 0 },
                watermark: held.watermark,
                seen_files: held.seen_files.iter().cloned().collect(),
                // An inbox starts empty, at 0, in every coordinator.
                pushed_until: 0,
            })
            .collect();
        let splits = slot.receivers.len() as u32;
        let reopens =
            slot.receivers
                .iter()
                .zip(&slot.positions)
                .map(|((split, worker), position)| {
                    let handover = position.handover(name, split, splits);
                    let cluster = &cluster;
                    async move {
                        let Some(w) = cluster.get(worker) else {
                            return Err(Error::WorkerLost(cluster.unavailable(worker)));
                        };
                        cluster
                            .call(
                                worker,
                                "reopen a receiver",
                                w.client.adopt_receiver(handover),
                            )
                            .await
                    }
                });
        match join_all(reopens).await.into_iter().find_map(|r| r.err()) {
            None => resumed.sources = resumed.sources.saturating_add(1),
            Some(e) => {
                warn!(source = %name, error = %e, "could not reopen a receiver where the checkpoint left it");
                slot.failure = Some(format!(
                    "could not resume from the checkpoint of interval {at}: {e}"
                ));
            }
        }
    }

    // Views as the checkpoint holds them: running then, from the same definition.
    // A view created after it starts where it first did; one that should be in it
    // but is not (it had stopped), or that no longer fits it, stops with the reason
    // rather than go on from empty state.
    let mut resumable = std::collections::BTreeSet::new();
    let sqls: std::collections::HashMap<String, Option<String>> = state
        .views
        .keys()
        .map(|name| (name.clone(), state.stage_sql(name)))
        .collect();
    for (name, view) in state.views.iter_mut() {
        if view.since.is_some_and(|s| s > at) || view.failure.is_some() {
            continue;
        }
        let sql = sqls.get(name).cloned().flatten();
        let refused = match manifest.views.get(name) {
            None => Some(format!(
                "it is not in the checkpoint of interval {at}: it had stopped before; drop it and create it again"
            )),
            Some(held) if Some(&held.sql) != sql.as_ref() => Some(format!(
                "the checkpoint of interval {at} holds another definition of it; drop it and create it again"
            )),
            Some(held) if held.partitions.len() != view.placement.len() => Some(format!(
                "its checkpoint (interval {at}) has {} state partitions, the server runs with {}: restart with --partitions {}, or drop it and create it again",
                held.partitions.len(),
                view.placement.len(),
                held.partitions.len()
            )),
            Some(_) => None,
        };
        match refused {
            Some(reason) => {
                warn!(view = %name, %reason, "cannot resume a view");
                view.failure = Some(reason);
            }
            None => {
                resumable.insert(name.clone());
            }
        }
    }
    let mut loads = Vec::new();
    for (name, view) in state.views.iter().filter(|(n, _)| resumable.contains(*n)) {
        let Some(held) = manifest.views.get(name) else {
            continue;
        };
        for (p, owner) in view.placement.iter() {
            let request = restore_request(name, p, Some((at, held.partitions.get(p as usize))));
            let cluster = &cluster;
            let name = name.clone();
            loads.push(async move {
                let result = match cluster.get(owner) {
                    Some(w) => {
                        cluster
                            .call(
                                owner,
                                "load a state partition",
                                w.client.restore_partition(request),
                            )
                            .await
                    }
                    None => Err(Error::WorkerLost(cluster.unavailable(owner))),
                };
                (name, result)
            });
        }
    }
    let mut failed: std::collections::BTreeMap<String, String> = Default::default();
    for (view, result) in join_all(loads).await {
        match result {
            Ok(loaded) => {
                resumed.partitions = resumed.partitions.saturating_add(1);
                resumed.bytes = resumed.bytes.saturating_add(loaded.bytes);
            }
            Err(e) => {
                failed.entry(view).or_insert(e.to_string());
            }
        }
    }
    for (name, view) in state.views.iter_mut() {
        let Some(held) = manifest
            .views
            .get(name)
            .filter(|_| resumable.contains(name))
        else {
            continue;
        };
        if let Some(reason) = failed.remove(name) {
            warn!(view = %name, error = %reason, "could not load a view's checkpoint");
            view.failure = Some(format!(
                "could not resume from the checkpoint of interval {at}: {reason}"
            ));
            continue;
        }
        view.first_interval = Some(at);
        view.last_interval = Some(at);
        view.partition_rows = held.partitions.iter().map(|p| p.view_rows).collect();
        resumed.views = resumed.views.saturating_add(1);
    }
    state.last_committed = Some(at);
    engine
        .checkpoints()
        .resumed(manifest, engine.clock().now_nanos());
    engine.publish_snapshot(state);
    // With the real clock, intervals that ended while the server was down run at once.
    let behind = engine
        .clock()
        .now_nanos()
        .saturating_sub(state.timeline.end_nanos(at))
        .max(0)
        .checked_div(state.timeline.width_nanos)
        .unwrap_or(0);
    info!(
        checkpoint = %at,
        next = %state.next,
        intervals_to_catch_up = behind,
        sources = resumed.sources,
        views = resumed.views,
        partitions = resumed.partitions,
        bytes = resumed.bytes,
        "resumed from the latest checkpoint; the intervals after it run again from their input"
    );
}
