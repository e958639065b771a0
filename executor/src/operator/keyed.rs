//! The keyed operator: any operator whose result for a key depends on that key's rows
//! alone — an aggregate of any function, `DISTINCT`, a top-N, window functions —
//! maintained over input that inserts and deletes rows.
//!
//! State is the multiset of the operator's input rows: each distinct row once, with
//! how many times it is there (`__w`), in partitions by key. Every interval:
//! 1. **map** (per input piece): the stateless input over the piece's inserted rows
//!    (weight +1) and deleted rows (weight -1), as kept columns `__c*` and key
//!    columns `__k*`, hash-shuffled by key;
//! 2. **reduce** (per partition): the keys the interval touched are looked up; their
//!    rows before are the state's, their rows after are those plus the shuffled rows,
//!    counts summed (a row whose count reaches 0 leaves). The operator — with whatever
//!    lies above it in the stage — runs over the rows of the touched keys before and
//!    after, and the difference of the two results is the stage's changelog.
//!
//! The operator reads a key's rows sorted by all their columns, and ties in its
//! orders are broken by all columns (see `dstream_planner::stream_plan`), so the
//! result for the same rows is the same every time, and what an interval deletes is
//! exactly what an earlier one inserted.

use std::collections::HashSet;
use std::sync::Arc;

use arrow::array::{Array, AsArray, BooleanArray, Int64Array, RecordBatch, UInt32Array};
use arrow::compute::{filter_record_batch, take_record_batch};
use arrow::datatypes::{DataType, Field, Int64Type, Schema, SchemaRef};
use arrow::row::{RowConverter, SortField};
use async_trait::async_trait;
use datafusion::functions_aggregate::expr_fn::sum;
use datafusion::logical_expr::{Expr, lit};
use datafusion::prelude::SessionContext;
use dstream_planner::stream_plan::KEPT;
use dstream_planner::{KeyedPlan, StreamPlan};

use crate::block::Block;
use crate::error::{Error, Result};
use crate::operator::aggregate::column;
use crate::operator::{
    Changelog, MapOperator, PartitionInput, PartitionOutput, ShufflePiece, StatePartition,
    StateTable, StreamOperator, ViewUpdate,
};
use crate::shuffle::{Wanted, hash_partition};
use crate::task::{PlanTemplate, scan};
use crate::view_runtime::conform;

/// The state table of the input rows kept per key, each with its multiplicity `__w`.
const KEPT_TABLE: &str = "kept";

/// The column of a kept row's count.
const WEIGHT: &str = "__w";

/// The keyed operator of one stage.
#[derive(Debug)]
pub struct KeyedOperator {
    plan: Arc<StreamPlan>,
    /// The kept columns then the key columns.
    kept: SchemaRef,
    /// `kept` and the count `__w`: the state's and the shuffle's rows.
    state_schema: SchemaRef,
    /// Where the key columns are in `state_schema`.
    key_columns: Vec<usize>,
    map: PlanTemplate,
    /// The rows of `state_schema` summed by row, without those whose count is 0.
    consolidate: PlanTemplate,
    /// The operator and what lies above it, over kept rows.
    reduce: PlanTemplate,
    /// Of some kept rows, those still worth keeping (see [`KeyedPlan::prune`]).
    prune: Option<PlanTemplate>,
}

impl KeyedOperator {
    pub fn new(plan: Arc<StreamPlan>) -> Result<Self> {
        let keyed: KeyedPlan = plan
            .keyed
            .clone()
            .ok_or_else(|| Error::Internal("keyed operator for a stage without one".into()))?;
        // As the map plan makes them: the reduce plan reads them with this schema.
        let kept = Arc::new(keyed.map.schema().as_arrow().clone());
        let mut fields: Vec<Field> = kept.fields().iter().map(|f| f.as_ref().clone()).collect();
        fields.push(Field::new(WEIGHT, DataType::Int64, false));
        let state_schema = Arc::new(Schema::new(fields));
        let width = kept.fields().len();
        let key_columns: Vec<usize> = (width.saturating_sub(keyed.keys.len())..width).collect();
        let groups: Vec<Expr> = kept.fields().iter().map(|f| column(f.name())).collect();
        let consolidate = scan("rows", state_schema.clone(), vec![])?
            .aggregate(groups, vec![sum(column(WEIGHT)).alias(WEIGHT)])?
            .filter(column(WEIGHT).not_eq(lit(0i64)))?
            .build()?;
        Ok(KeyedOperator {
            map: PlanTemplate::new(keyed.map.clone())?,
            consolidate: PlanTemplate::new(consolidate)?,
            reduce: PlanTemplate::new(keyed.reduce.clone())?,
            prune: keyed.prune.clone().map(PlanTemplate::new).transpose()?,
            plan,
            kept,
            state_schema,
            key_columns,
        })
    }

    /// `batch` (in the kept layout) with every row's count `weight`.
    fn weighed(&self, batch: &RecordBatch, weight: i64) -> Result<RecordBatch> {
        let mut columns = batch.columns().to_vec();
        columns.push(Arc::new(Int64Array::from_value(weight, batch.num_rows())));
        Ok(RecordBatch::try_new(self.state_schema.clone(), columns)?)
    }

    /// Splits state rows into those whose key is in `touched` and the others.
    fn split_touched(
        &self,
        rows: &[RecordBatch],
        delta: &[RecordBatch],
    ) -> Result<(Vec<RecordBatch>, Vec<RecordBatch>)> {
        if self.key_columns.is_empty() {
            return Ok((rows.to_vec(), Vec::new()));
        }
        let converter = RowConverter::new(
            self.key_columns
                .iter()
                .filter_map(|k| self.state_schema.fields().get(*k))
                .map(|f| SortField::new(f.data_type().clone()))
                .collect(),
        )?;
        let keys_of = |b: &RecordBatch| -> Result<arrow::row::Rows> {
            let columns: Vec<_> = self
                .key_columns
                .iter()
                .filter_map(|k| b.columns().get(*k).cloned())
                .collect();
            Ok(converter.convert_columns(&columns)?)
        };
        let delta_keys = delta.iter().map(keys_of).collect::<Result<Vec<_>>>()?;
        let touched: HashSet<&[u8]> = delta_keys
            .iter()
            .flat_map(|rows| rows.iter().map(|r| r.data()))
            .collect();
        let (mut inside, mut outside) = (Vec::new(), Vec::new());
        for batch in rows {
            let keys = keys_of(batch)?;
            let mask: BooleanArray = keys
                .iter()
                .map(|r| Some(touched.contains(r.data())))
                .collect();
            let hit = filter_record_batch(batch, &mask)?;
            let miss = filter_record_batch(batch, &arrow::compute::not(&mask)?)?;
            if hit.num_rows() > 0 {
                inside.push(hit);
            }
            if miss.num_rows() > 0 {
                outside.push(miss);
            }
        }
        Ok((inside, outside))
    }

    /// The kept rows each as many times as its count says, without the count.
    fn expand(&self, rows: &[RecordBatch]) -> Result<Vec<RecordBatch>> {
        let width = self.kept.fields().len();
        let mut out = Vec::with_capacity(rows.len());
        for batch in rows {
            let weights = batch
                .column(width)
                .as_primitive_opt::<Int64Type>()
                .ok_or_else(|| Error::Internal("kept rows without their counts".into()))?;
            if weights.null_count() > 0 || weights.values().iter().any(|w| *w < 1) {
                return Err(Error::Internal(format!(
                    "stage {} was asked to delete a row it does not have",
                    self.plan.name
                )));
            }
            let projected = batch.project(&(0..width).collect::<Vec<_>>())?;
            let projected = RecordBatch::try_new(self.kept.clone(), projected.columns().to_vec())?;
            if weights.values().iter().all(|w| *w == 1) {
                out.push(projected);
                continue;
            }
            let mut indices = Vec::new();
            for (i, w) in weights.values().iter().enumerate() {
                let i = u32::try_from(i)
                    .map_err(|_| Error::Internal("a batch of over 4 billion rows".into()))?;
                for _ in 0..*w {
                    indices.push(i);
                }
            }
            out.push(take_record_batch(&projected, &UInt32Array::from(indices))?);
        }
        Ok(out)
    }

    /// Of the kept rows `rows` (with counts), those the operator can still need, with
    /// counts: all of them unless the plan prunes.
    async fn pruned(
        &self,
        ctx: &SessionContext,
        rows: Vec<RecordBatch>,
    ) -> Result<Vec<RecordBatch>> {
        let Some(prune) = &self.prune else {
            return Ok(rows);
        };
        let expanded = self.expand(&rows)?;
        if expanded.iter().all(|b| b.num_rows() == 0) {
            return Ok(Vec::new());
        }
        let kept = prune
            .execute(ctx, vec![(KEPT, self.kept.clone(), expanded)])
            .await?
            .iter()
            .map(|b| {
                let b = RecordBatch::try_new(self.kept.clone(), b.columns().to_vec())?;
                self.weighed(&b, 1)
            })
            .collect::<Result<Vec<_>>>()?;
        self.consolidate
            .execute(ctx, vec![("rows", self.state_schema.clone(), kept)])
            .await?
            .into_iter()
            .map(|b| {
                Ok(RecordBatch::try_new(
                    self.state_schema.clone(),
                    b.columns().to_vec(),
                )?)
            })
            .collect()
    }

    /// The stage's rows for the kept rows `rows` (with counts): none for none.
    async fn compute(
        &self,
        ctx: &SessionContext,
        rows: &[RecordBatch],
    ) -> Result<Vec<RecordBatch>> {
        let expanded = self.expand(rows)?;
        if expanded.iter().all(|b| b.num_rows() == 0) {
            return Ok(Vec::new());
        }
        let out = self
            .reduce
            .execute(ctx, vec![(KEPT, self.kept.clone(), expanded)])
            .await?;
        conform(&self.plan.schema, out)
    }
}

#[async_trait]
impl MapOperator for KeyedOperator {
    async fn map_block(
        &self,
        ctx: &SessionContext,
        block: &Block,
        wanted: &Wanted,
    ) -> Result<Vec<ShufflePiece>> {
        let mut rows = Vec::new();
        for (batches, weight) in [(&block.batches, 1i64), (&block.deletes, -1i64)] {
            if batches.iter().all(|b| b.num_rows() == 0) {
                continue;
            }
            let out = self
                .map
                .execute(
                    ctx,
                    vec![(&block.source, block.schema.clone(), batches.clone())],
                )
                .await?;
            for b in out {
                let b = RecordBatch::try_new(self.kept.clone(), b.columns().to_vec())?;
                rows.push(self.weighed(&b, weight)?);
            }
        }
        Ok(
            hash_partition(&rows, &self.key_columns, self.plan.partitions, wanted)?
                .into_iter()
                .map(|rows| ShufflePiece {
                    rows,
                    distinct: Vec::new(),
                })
                .collect(),
        )
    }
}

#[async_trait]
impl StreamOperator for KeyedOperator {
    fn state(&self) -> Vec<StateTable> {
        vec![StateTable::new(
            KEPT_TABLE,
            "the input rows per key, each with its multiplicity __w",
        )]
    }

    async fn process_interval(
        &self,
        ctx: &SessionContext,
        input: PartitionInput,
    ) -> Result<PartitionOutput> {
        let prev = input.state;
        let delta: Vec<RecordBatch> = input
            .pieces
            .into_iter()
            .flat_map(|p| p.rows)
            .filter(|b| b.num_rows() > 0)
            .map(|b| RecordBatch::try_new(self.state_schema.clone(), b.columns().to_vec()))
            .collect::<std::result::Result<_, _>>()?;
        if delta.is_empty() {
            return Ok(PartitionOutput::unchanged(prev));
        }
        let (before, untouched) = self.split_touched(prev.table(KEPT_TABLE), &delta)?;
        let mut all = before.clone();
        all.extend(delta);
        let after: Vec<RecordBatch> = self
            .consolidate
            .execute(ctx, vec![("rows", self.state_schema.clone(), all)])
            .await?
            .into_iter()
            .map(|b| RecordBatch::try_new(self.state_schema.clone(), b.columns().to_vec()))
            .collect::<std::result::Result<_, _>>()?;
        let after = self.pruned(ctx, after).await?;
        let old_rows = self.compute(ctx, &before).await?;
        let new_rows = self.compute(ctx, &after).await?;
        let changelog = Changelog::between(&self.plan.schema, old_rows, new_rows)?;
        let view = changelog.apply_to(&self.plan.schema, &input.rows)?;
        let mut rows = untouched;
        rows.extend(after);
        let mut state = StatePartition {
            watermark: input.watermark,
            ..StatePartition::default()
        };
        state.set(KEPT_TABLE, rows);
        Ok(PartitionOutput {
            state: Arc::new(state),
            view: ViewUpdate::Replace(view),
            changelog,
        })
    }
}
