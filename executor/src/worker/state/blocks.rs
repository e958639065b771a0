//! [`InputBlocks`]: the input blocks a worker holds — sealed by its receivers,
//! replicas of its peers' (kept encoded, or as lineage to seal again), and the
//! changes a stage kept for the stages that read it — by (source, interval, index).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};

use arrow::datatypes::SchemaRef;
use arrow_flight::FlightData;
use arrow_flight::utils::flight_data_to_batches;
use datafusion::prelude::SessionContext;
use dstream_planner::SourceDef;
use dstream_storage::{IntervalId, Timeline};

use super::lock;
use crate::block::{Block, with_interval_column};
use crate::connector::Split;
use crate::error::{Error, Result};
use crate::ingest::SourceRuntime;

/// The input blocks held here; the only owner of them.
#[derive(Debug, Default)]
pub struct InputBlocks(Mutex<BTreeMap<(String, IntervalId), IntervalBlocks>>);

impl InputBlocks {
    /// Stores a block sealed (or kept) here.
    pub fn put(&self, block: Arc<Block>) {
        lock(&self.0)
            .entry((block.source.clone(), block.interval))
            .or_default()
            .insert(block.index as u32, HeldBlock::Decoded(block));
    }

    /// Stores a replica as it arrived; [`InputBlocks::get`] decodes it when read.
    pub fn put_encoded(&self, block: EncodedBlock) {
        lock(&self.0)
            .entry((block.source.clone(), block.interval))
            .or_default()
            .insert(block.index as u32, HeldBlock::Encoded(Arc::new(block)));
    }

    /// Keeps the lineage of blocks a peer sealed, in place of copies of them.
    pub fn put_lineage(&self, lineage: LineageBlocks, blocks: &[u32]) {
        let lineage = Arc::new(lineage);
        let mut held = lock(&self.0);
        let interval = held
            .entry((lineage.def.name.clone(), lineage.interval))
            .or_default();
        for index in blocks {
            interval.insert(*index, HeldBlock::Lineage(lineage.clone()));
        }
    }

    /// The block, if this worker holds it; a replica is decoded, or sealed again from
    /// its lineage, (once) here.
    /// `ctx` runs a replay.
    pub fn get(
        &self,
        source: &str,
        interval: IntervalId,
        index: u32,
        ctx: &SessionContext,
    ) -> Result<Option<Arc<Block>>> {
        let key = (source.to_string(), interval);
        let held = lock(&self.0)
            .get(&key)
            .and_then(|blocks| blocks.get(&index).cloned());
        let produced: Vec<Arc<Block>> = match held {
            None => return Ok(None),
            Some(HeldBlock::Decoded(block)) => return Ok(Some(block)),
            Some(HeldBlock::Encoded(encoded)) => vec![Arc::new(encoded.decode()?)],
            Some(HeldBlock::Lineage(lineage)) => lineage.blocks(ctx)?.to_vec(),
        };
        let wanted = produced
            .iter()
            .find(|b| b.index as u32 == index)
            .cloned()
            .ok_or_else(|| {
                Error::Internal(format!(
                    "sealing interval {interval} of source {source} again did not give block {index}"
                ))
            })?;
        // Keep what was produced decoded, where the replica (not a newer copy) still is.
        if let Some(blocks) = lock(&self.0).get_mut(&key) {
            for block in produced {
                if let Some(slot) = blocks.get_mut(&(block.index as u32))
                    && !matches!(slot, HeldBlock::Decoded(_))
                {
                    *slot = HeldBlock::Decoded(block);
                }
            }
        }
        Ok(Some(wanted))
    }

    pub fn count(&self) -> u64 {
        lock(&self.0).values().map(|b| b.len() as u64).sum()
    }

    /// Drops blocks older than the retention allows after `interval`, except those
    /// from `lineage` on: recovery may replay them.
    pub fn expire(&self, interval: IntervalId, retain_intervals: u64, lineage: Option<IntervalId>) {
        let mut keep_from = interval
            .0
            .saturating_sub(retain_intervals.saturating_sub(1));
        if let Some(lineage) = lineage {
            keep_from = keep_from.min(lineage.0);
        }
        lock(&self.0).retain(|(_, i), _| i.0 >= keep_from);
    }

    /// Forgets the blocks of `source` (dropped).
    pub fn forget(&self, source: &str) {
        lock(&self.0).retain(|(name, _), _| name != source);
    }

    /// Forgets every block.
    pub fn clear(&self) {
        lock(&self.0).clear();
    }
}

/// The blocks of one source in one interval, by index.
pub type IntervalBlocks = BTreeMap<u32, HeldBlock>;

/// An input block as a worker holds it.
#[derive(Clone, Debug)]
pub enum HeldBlock {
    Decoded(Arc<Block>),
    /// A replica, kept as the Arrow IPC messages it arrived in (without its
    /// `_interval` column) and decoded the first time it is read: most replicas are
    /// only there in case their first copy is lost, and are never read.
    Encoded(Arc<EncodedBlock>),
    /// A replica of a replayable source's block, kept as how to seal its interval
    /// again: the rows are produced the first time one of the blocks is read.
    Lineage(Arc<LineageBlocks>),
}

/// The blocks one receiver of a replayable source sealed in one interval, as their
/// replica worker keeps them: what [`SourceRuntime::replay`] needs to produce them
/// again.
#[derive(Debug)]
pub struct LineageBlocks {
    def: Arc<SourceDef>,
    block_rows: usize,
    split: Split,
    interval: IntervalId,
    timeline: Timeline,
    watermark: Option<i64>,
    /// The seal done again, by the first read.
    replayed: OnceLock<std::result::Result<Vec<Arc<Block>>, String>>,
}

impl LineageBlocks {
    pub fn new(
        def: Arc<SourceDef>,
        block_rows: usize,
        split: Split,
        interval: IntervalId,
        timeline: Timeline,
        watermark: Option<i64>,
    ) -> Self {
        LineageBlocks {
            def,
            block_rows,
            split,
            interval,
            timeline,
            watermark,
            replayed: OnceLock::new(),
        }
    }

    /// The blocks, sealed again the first time they are asked for.
    fn blocks(&self, ctx: &SessionContext) -> Result<&[Arc<Block>]> {
        let replayed = self.replayed.get_or_init(|| {
            SourceRuntime::replay(
                self.def.clone(),
                ctx,
                self.block_rows,
                self.split,
                self.interval,
                &self.timeline,
                self.watermark,
            )
            .map_err(|e| e.to_string())
        });
        match replayed {
            Ok(blocks) => Ok(blocks),
            Err(e) => Err(Error::Internal(format!(
                "cannot seal interval {} of source {} again: {e}",
                self.interval, self.def.name
            ))),
        }
    }
}

/// A replica of an input block as it arrived over Flight.
#[derive(Debug)]
pub struct EncodedBlock {
    pub source: String,
    pub interval: IntervalId,
    pub index: usize,
    /// The source's full schema, `_interval` included.
    pub schema: SchemaRef,
    /// The start of the interval: the value of every row's `_interval`.
    pub interval_start: i64,
    /// Flight messages: the schema, then the record batches.
    pub messages: Vec<FlightData>,
}

impl EncodedBlock {
    fn decode(&self) -> Result<Block> {
        let batches = flight_data_to_batches(&self.messages)?
            .iter()
            .map(|b| with_interval_column(b, &self.schema, self.interval_start))
            .collect::<Result<Vec<_>>>()?;
        Ok(Block {
            source: self.source.clone(),
            interval: self.interval,
            index: self.index,
            schema: self.schema.clone(),
            batches,
            deletes: Vec::new(),
        })
    }
}
