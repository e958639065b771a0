//! Hash partitioning of batches by key columns: the shuffle between the map and the
//! reduce stage.
//!
//! The hash is DataFusion's with a fixed seed, so a key lands in the same partition in
//! every process and every run — a requirement for recomputing lost partitions.

use std::num::NonZeroU64;

use arrow::array::{RecordBatch, UInt32Array};
use arrow::compute::take_record_batch;
use datafusion::common::hash_utils::{RandomState, create_hashes};

use crate::error::{Error, Result};

const SHUFFLE_SEED: u64 = 0x0d57_2ea3;

/// Splits `batches` into `partitions` groups by the hash of the columns `keys`.
pub fn hash_partition(
    batches: &[RecordBatch],
    keys: &[usize],
    partitions: usize,
) -> Result<Vec<Vec<RecordBatch>>> {
    let Some(modulus) = NonZeroU64::new(partitions as u64) else {
        return Err(Error::Internal(
            "hash partitioning into no partitions".into(),
        ));
    };
    let no_partition = |p: usize| Error::Internal(format!("no shuffle partition {p}"));
    let mut out = vec![Vec::new(); partitions];
    let state = RandomState::with_seed(SHUFFLE_SEED);
    let mut hashes = Vec::new();
    for batch in batches {
        if batch.num_rows() == 0 {
            continue;
        }
        if partitions == 1 || keys.is_empty() {
            out.first_mut()
                .ok_or_else(|| no_partition(0))?
                .push(batch.clone());
            continue;
        }
        hashes.clear();
        hashes.resize(batch.num_rows(), 0);
        let arrays: Vec<_> = keys.iter().map(|&k| batch.column(k).clone()).collect();
        create_hashes(&arrays, &state, &mut hashes)?;
        let mut indices: Vec<Vec<u32>> = vec![Vec::new(); partitions];
        for (row, h) in hashes.iter().enumerate() {
            let p = (*h % modulus) as usize;
            indices
                .get_mut(p)
                .ok_or_else(|| no_partition(p))?
                .push(row as u32);
        }
        for (part, idx) in out.iter_mut().zip(indices) {
            if idx.is_empty() {
                continue;
            }
            part.push(take_record_batch(batch, &UInt32Array::from(idx))?);
        }
    }
    Ok(out)
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
        let parts = hash_partition(&[batch.clone(), batch], &[0], 4)?;
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
