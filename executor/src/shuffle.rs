//! Hash partitioning of batches by key columns: the shuffle between the map and the
//! reduce stage.
//!
//! The hash is DataFusion's with a fixed seed, so a key lands in the same partition in
//! every process and every run — a requirement for recomputing lost partitions. A
//! recovery's replay needs only the lost partitions' rows: [`Wanted`] says which, and
//! [`in_partitions`] keeps just those rows of an input, before any aggregation.

use std::num::NonZeroU64;
use std::sync::Arc;

use arrow::array::{ArrayRef, BooleanArray, RecordBatch, UInt32Array};
use arrow::compute::take_record_batch;
use arrow::datatypes::DataType;
use datafusion::common::hash_utils::{RandomState, create_hashes};
use datafusion::logical_expr::{
    ColumnarValue, Expr, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};

use crate::error::{Error, Result};

const SHUFFLE_SEED: u64 = 0x0d57_2ea3;

/// The partitions a map task produces rows for: all of them while the stream runs,
/// only the lost ones while a recovery replays input into them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub enum Wanted {
    #[default]
    All,
    /// Sorted, without duplicates.
    Only(Vec<u32>),
}

impl Wanted {
    /// From a map task's list of partitions; an empty list means all.
    pub fn from_list(mut partitions: Vec<u32>) -> Wanted {
        if partitions.is_empty() {
            return Wanted::All;
        }
        partitions.sort_unstable();
        partitions.dedup();
        Wanted::Only(partitions)
    }

    pub fn contains(&self, partition: usize) -> bool {
        match self {
            Wanted::All => true,
            Wanted::Only(list) => {
                u32::try_from(partition).is_ok_and(|p| list.binary_search(&p).is_ok())
            }
        }
    }
}

/// Bits of a piece id that hold the block index; the bits above hold the input.
const BLOCK_BITS: u32 = 24;

/// The id a map task's output is kept under: its block's index, and which of its
/// stage's inputs the block is of (a stage reads several with UNION ALL), so that
/// blocks of two inputs with the same index stay apart.
pub fn piece_id(input: u32, block: u32) -> Result<u32> {
    if block >> BLOCK_BITS != 0 || input >> (32 - BLOCK_BITS) != 0 {
        return Err(Error::Internal(format!(
            "block {block} of input {input} has no piece id: at most {} blocks per interval \
             and {} inputs per stage",
            1u32 << BLOCK_BITS,
            1u32 << (32 - BLOCK_BITS)
        )));
    }
    Ok((input << BLOCK_BITS) | block)
}

/// The partition of every row of `keys` (columns of equal length) among `partitions`,
/// into `out`. Without keys, or with one partition, every row is in partition 0.
fn partitions_of(
    keys: &[ArrayRef],
    rows: usize,
    partitions: usize,
    out: &mut Vec<u64>,
) -> datafusion::error::Result<()> {
    out.clear();
    out.resize(rows, 0);
    let Some(count) = NonZeroU64::new(partitions as u64).filter(|c| c.get() > 1) else {
        return Ok(());
    };
    if keys.is_empty() {
        return Ok(());
    }
    create_hashes(keys, &RandomState::with_seed(SHUFFLE_SEED), out)?;
    for h in out.iter_mut() {
        *h %= count;
    }
    Ok(())
}

/// Splits `batches` into `partitions` groups by the hash of the columns `keys`; the
/// groups of partitions not `wanted` stay empty.
pub fn hash_partition(
    batches: &[RecordBatch],
    keys: &[usize],
    partitions: usize,
    wanted: &Wanted,
) -> Result<Vec<Vec<RecordBatch>>> {
    if partitions == 0 {
        return Err(Error::Internal(
            "hash partitioning into no partitions".into(),
        ));
    }
    let mut out = vec![Vec::new(); partitions];
    let mut assigned = Vec::new();
    for batch in batches {
        if batch.num_rows() == 0 {
            continue;
        }
        let arrays: Vec<ArrayRef> = keys.iter().map(|&k| batch.column(k).clone()).collect();
        partitions_of(&arrays, batch.num_rows(), partitions, &mut assigned)?;
        let mut indices: Vec<Vec<u32>> = vec![Vec::new(); partitions];
        for (row, p) in assigned.iter().enumerate() {
            if let Some(list) = indices.get_mut(*p as usize) {
                list.push(row as u32);
            }
        }
        for (p, (idx, group)) in indices.into_iter().zip(out.iter_mut()).enumerate() {
            if idx.is_empty() || !wanted.contains(p) {
                continue;
            }
            if idx.len() == batch.num_rows() {
                group.push(batch.clone());
            } else {
                group.push(take_record_batch(batch, &UInt32Array::from(idx))?);
            }
        }
    }
    Ok(out)
}

/// A predicate over key expressions: whether the row's keys hash to a wanted
/// partition, as [`hash_partition`] would place the same key columns. Filtering a
/// map's input with it before a partial aggregate keeps only the groups of the
/// wanted partitions.
pub fn in_partitions(keys: Vec<Expr>, partitions: usize, wanted: Vec<u32>) -> Expr {
    ScalarUDF::from(InPartitions {
        signature: Signature::variadic_any(Volatility::Immutable),
        partitions,
        wanted,
    })
    .call(keys)
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct InPartitions {
    signature: Signature,
    partitions: usize,
    /// Sorted.
    wanted: Vec<u32>,
}

impl ScalarUDFImpl for InPartitions {
    fn name(&self) -> &str {
        "dstream_in_partitions"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _args: &[DataType]) -> datafusion::error::Result<DataType> {
        Ok(DataType::Boolean)
    }

    fn invoke_with_args(
        &self,
        args: ScalarFunctionArgs,
    ) -> datafusion::error::Result<ColumnarValue> {
        let keys = args
            .args
            .iter()
            .map(|k| k.to_array(args.number_rows))
            .collect::<datafusion::error::Result<Vec<_>>>()?;
        let mut assigned = Vec::new();
        partitions_of(&keys, args.number_rows, self.partitions, &mut assigned)?;
        let keep: BooleanArray = assigned
            .iter()
            .map(|p| Some(u32::try_from(*p).is_ok_and(|p| self.wanted.binary_search(&p).is_ok())))
            .collect();
        Ok(ColumnarValue::Array(Arc::new(keep)))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{Array, Int64Array};
    use arrow::datatypes::{DataType, Field, Schema};

    use super::*;

    #[test]
    fn every_row_lands_in_exactly_one_partition_by_key() -> Result<()> {
        let schema = Arc::new(Schema::new(vec![Field::new("k", DataType::Int64, false)]));
        let keys = Int64Array::from((0..1000).map(|i| i % 37).collect::<Vec<_>>());
        let batch = RecordBatch::try_new(schema, vec![Arc::new(keys)])?;
        let parts = hash_partition(&[batch.clone(), batch], &[0], 4, &Wanted::All)?;
        let total: usize = parts.iter().flatten().map(|b| b.num_rows()).sum();
        assert_eq!(total, 2000);
        let mut owner = std::collections::HashMap::new();
        for (p, batches) in parts.iter().enumerate() {
            for b in batches {
                let col = b
                    .column(0)
                    .as_any()
                    .downcast_ref::<Int64Array>()
                    .expect("int64");
                for i in 0..col.len() {
                    assert_eq!(*owner.entry(col.value(i)).or_insert(p), p);
                }
            }
        }
        assert_eq!(owner.len(), 37);
        assert!(
            owner
                .values()
                .collect::<std::collections::HashSet<_>>()
                .len()
                > 1
        );
        Ok(())
    }
}
