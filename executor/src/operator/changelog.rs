//! Changelogs: what one interval changed in a view, as deletions then insertions of
//! view rows. Subscriptions and (later) sinks consume them.

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use arrow::row::{RowConverter, SortField};

use crate::error::{Error, Result};

/// The changes of one interval, as deletions then insertions of view rows.
#[derive(Clone, Debug, Default)]
pub struct Changelog {
    pub deletes: Vec<RecordBatch>,
    pub inserts: Vec<RecordBatch>,
}

impl Changelog {
    pub fn is_empty(&self) -> bool {
        self.deletes
            .iter()
            .chain(&self.inserts)
            .all(|b| b.num_rows() == 0)
    }

    pub fn extend(&mut self, other: Changelog) {
        self.deletes.extend(other.deletes);
        self.inserts.extend(other.inserts);
    }

    /// The changelog of a set of groups from their view rows before and after:
    /// rows only before are deleted, rows only after inserted, unchanged rows left out.
    pub fn between(
        schema: &SchemaRef,
        before: Vec<RecordBatch>,
        after: Vec<RecordBatch>,
    ) -> Result<Changelog> {
        use std::collections::HashMap;
        let converter = row_converter(schema)?;
        // Keys borrow the encoded rows, which live until the end of this function.
        let mut counts: HashMap<&[u8], i64> = HashMap::new();
        let encode = |batches: &[RecordBatch]| -> Result<Vec<arrow::row::Rows>> {
            batches
                .iter()
                .map(|b| Ok(converter.convert_columns(b.columns())?))
                .collect()
        };
        let before_rows = encode(&before)?;
        let after_rows = encode(&after)?;
        for rows in &before_rows {
            for r in rows.iter() {
                let count = counts.entry(r.data()).or_default();
                *count = count.saturating_add(1);
            }
        }
        for rows in &after_rows {
            for r in rows.iter() {
                let count = counts.entry(r.data()).or_default();
                *count = count.saturating_sub(1);
            }
        }
        // Keep rows whose net count says they changed: positive -> deleted, negative -> inserted.
        let select = |batches: &[RecordBatch],
                      rows: &[arrow::row::Rows],
                      sign: i64,
                      counts: &mut HashMap<&[u8], i64>|
         -> Result<Vec<RecordBatch>> {
            let mut out = Vec::new();
            for (batch, rows) in batches.iter().zip(rows) {
                let mut keep = Vec::new();
                for (i, r) in rows.iter().enumerate() {
                    if let Some(c) = counts.get_mut(r.as_ref())
                        && c.signum() == sign
                    {
                        // Toward zero: c and sign have the same sign.
                        *c = c.saturating_sub(sign);
                        keep.push(i as u32);
                    }
                }
                if !keep.is_empty() {
                    let idx = arrow::array::UInt32Array::from(keep);
                    out.push(arrow::compute::take_record_batch(batch, &idx)?);
                }
            }
            Ok(out)
        };
        let deletes = select(&before, &before_rows, 1, &mut counts)?;
        let inserts = select(&after, &after_rows, -1, &mut counts)?;
        Ok(Changelog { deletes, inserts })
    }

    /// `rows` with this changelog applied: each deleted row taken out once, the
    /// inserted rows added. A deleted row that `rows` does not have is an error: the
    /// changelog was not made against these rows.
    pub fn apply_to(&self, schema: &SchemaRef, rows: &[RecordBatch]) -> Result<Vec<RecordBatch>> {
        use std::collections::HashMap;
        if self.deletes.iter().all(|b| b.num_rows() == 0) {
            let mut out = rows.to_vec();
            out.extend(self.inserts.iter().filter(|b| b.num_rows() > 0).cloned());
            return Ok(out);
        }
        let converter = row_converter(schema)?;
        let deleted = self
            .deletes
            .iter()
            .map(|b| Ok(converter.convert_columns(b.columns())?))
            .collect::<Result<Vec<_>>>()?;
        let mut pending: HashMap<&[u8], usize> = HashMap::new();
        for r in deleted.iter().flat_map(|rows| rows.iter()) {
            let n = pending.entry(r.data()).or_default();
            *n = n.saturating_add(1);
        }
        let mut out = Vec::with_capacity(rows.len().saturating_add(self.inserts.len()));
        for batch in rows {
            let encoded = converter.convert_columns(batch.columns())?;
            let mut keep = Vec::with_capacity(batch.num_rows());
            let mut dropped = false;
            for r in encoded.iter() {
                match pending.get_mut(r.data()) {
                    Some(n) if *n > 0 => {
                        *n = n.saturating_sub(1);
                        keep.push(false);
                        dropped = true;
                    }
                    _ => keep.push(true),
                }
            }
            if !dropped {
                out.push(batch.clone());
            } else {
                let mask = arrow::array::BooleanArray::from(keep);
                let kept = arrow::compute::filter_record_batch(batch, &mask)?;
                if kept.num_rows() > 0 {
                    out.push(kept);
                }
            }
        }
        if pending.values().any(|n| *n > 0) {
            return Err(Error::Internal(
                "a changelog deletes rows its view does not have".into(),
            ));
        }
        out.extend(self.inserts.iter().filter(|b| b.num_rows() > 0).cloned());
        Ok(out)
    }
}

/// Encodes whole rows of `schema` for comparison.
fn row_converter(schema: &SchemaRef) -> Result<RowConverter> {
    Ok(RowConverter::new(
        schema
            .fields()
            .iter()
            .map(|f| SortField::new(f.data_type().clone()))
            .collect(),
    )?)
}
