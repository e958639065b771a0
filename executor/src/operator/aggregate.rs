//! The incremental aggregate: running `GROUP BY` aggregates and windowed aggregates.
//!
//! State is a table of *accumulators* per group: for every aggregate call the columns
//! it needs to be merged (`count` → n; `sum`, `avg` → s, n; `min`, `max` → m), plus
//! `__rows`, the number of input rows of the group. Every interval:
//! 1. **map** (per block): the stateless input, then a partial aggregate into the same
//!    accumulator layout; for `HOP`, each pane's partials are added to the `size/slide`
//!    windows that contain the pane; then a hash shuffle by group key.
//! 2. **reduce** (per partition): `state(t) = combine(state(t-1) ∪ partials)`, the
//!    combine being `sum` of counts and sums, `min` of mins, `max` of maxes. The
//!    changelog compares the touched groups before and after. With `EMIT ON WINDOW
//!    CLOSE`, windows the watermark has passed are emitted and leave the state.
//!
//! `count(DISTINCT x)` keeps the distinct (group, x) pairs per partition and counts
//! only pairs not seen before.
//!
//! All of it runs as DataFusion plans over the immutable batches of the inputs.

use std::sync::Arc;

use arrow::array::{AsArray, RecordBatch};
use arrow::compute::{filter_record_batch, not as not_mask};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use async_trait::async_trait;
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{Column, DFSchema, NullEquality, ScalarValue};
use datafusion::functions_aggregate::expr_fn::{count, max, min, sum};
use datafusion::logical_expr::{Expr, JoinType, LogicalPlan, LogicalPlanBuilder, cast, lit, when};
use datafusion::prelude::SessionContext;
use dstream_planner::{AggregateKind, AggregatePlan, EmitMode, StreamPlan, WindowKind};

use crate::block::Block;
use crate::error::{Error, Result};
use crate::operator::{
    Changelog, MapOperator, PartitionInput, PartitionOutput, ShufflePiece, StatePartition,
    StateTable, StreamOperator, ViewUpdate,
};
use crate::shuffle::{Wanted, hash_partition, in_partitions};
use crate::task::{PlanTemplate, bind_scan, execute, scan};

const ROWS: &str = "__rows";

/// The table of the accumulators of every group (of every open window).
pub(crate) const ACCUMULATORS: &str = "rows";

/// Sliding windows by add/subtract: the table of the running values of the last
/// window emitted, per group (window key columns NULL).
pub(crate) const RUNNING: &str = "running";

/// The table of the distinct (group, value) pairs of the `d`-th `count(DISTINCT)`.
fn distinct_table(d: usize) -> String {
    format!("distinct-{d}")
}

/// How one state column is merged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Combine {
    Sum,
    Min,
    Max,
}

/// The incremental aggregate of one stream plan.
#[derive(Debug)]
pub struct AggregateOperator {
    pub(crate) plan: Arc<StreamPlan>,
    /// The plan's aggregation.
    aggregate: AggregatePlan,
    /// Number of group keys; state columns `__k0 .. __k{keys-1}` come first.
    pub(crate) keys: usize,
    /// Schema of the state and of the partials (all columns nullable).
    pub(crate) state_schema: SchemaRef,
    /// How each non-key state column is merged, in order (ending with `__rows`).
    combine: Vec<Combine>,
    /// Schema of the distinct pairs of each `count(DISTINCT ...)`, by call index.
    distinct_schemas: Vec<(usize, SchemaRef)>,
    /// HOP with window close and invertible aggregates: state keeps panes, and windows
    /// are assembled by add/subtract (see [`super::sliding`]).
    pub(crate) sliding: bool,
    /// The plans every interval runs, optimized once (set by `new`).
    templates: Option<Templates>,
}

/// The plans of an aggregate that every interval runs, over their input tables:
/// `partial` over the source, `combine` and `view` over `state`.
#[derive(Debug)]
struct Templates {
    partial: PlanTemplate,
    combine: PlanTemplate,
    view: PlanTemplate,
}

pub(crate) fn key_name(i: usize) -> String {
    format!("__k{i}")
}

pub(crate) fn column(name: &str) -> Expr {
    Expr::Column(Column::from_name(name))
}

/// Re-labels `batch` with `schema` (same columns; the schema's fields are nullable).
pub(crate) fn relabel(batch: &RecordBatch, schema: &SchemaRef) -> Result<RecordBatch> {
    Ok(RecordBatch::try_new(
        schema.clone(),
        batch.columns().to_vec(),
    )?)
}

fn nullable(schema: &Schema) -> SchemaRef {
    Arc::new(Schema::new(
        schema
            .fields()
            .iter()
            .map(|f| f.as_ref().clone().with_nullable(true))
            .collect::<Vec<Field>>(),
    ))
}

impl AggregateOperator {
    pub fn new(plan: Arc<StreamPlan>) -> Result<Self> {
        let aggregate = plan.aggregate.clone().ok_or_else(|| {
            Error::Internal("aggregate operator for a plan without aggregate".into())
        })?;
        let keys = aggregate.group_exprs.len();
        let mut combine = Vec::new();
        for call in &aggregate.calls {
            match call.kind {
                AggregateKind::Count | AggregateKind::CountDistinct => combine.push(Combine::Sum),
                AggregateKind::Sum | AggregateKind::Avg => {
                    combine.extend([Combine::Sum, Combine::Sum])
                }
                AggregateKind::Min => combine.push(Combine::Min),
                AggregateKind::Max => combine.push(Combine::Max),
            }
        }
        combine.push(Combine::Sum);
        let mut op = AggregateOperator {
            plan: plan.clone(),
            aggregate: aggregate.clone(),
            keys,
            state_schema: Arc::new(Schema::empty()),
            combine,
            distinct_schemas: Vec::new(),
            sliding: plan.emit == EmitMode::OnWindowClose
                && aggregate.invertible()
                && plan
                    .window
                    .as_ref()
                    .is_some_and(|w| w.kind == WindowKind::Hop),
            templates: None,
        };
        // The layouts are whatever the partial plans produce over an empty input.
        let empty = bind_scan(
            &plan.input,
            &plan.source,
            Arc::new(plan_source_schema(&plan)?),
            vec![],
        )?;
        op.state_schema = nullable(op.partial_plan(empty.clone())?.schema().as_arrow());
        for (i, call) in aggregate.calls.iter().enumerate() {
            if call.kind == AggregateKind::CountDistinct {
                let schema = nullable(op.distinct_plan(empty.clone(), i)?.schema().as_arrow());
                op.distinct_schemas.push((i, schema));
            }
        }
        let mut partial = op.partial_plan(empty)?;
        if !op.sliding {
            partial = op.expand_panes(partial)?;
        }
        op.templates = Some(Templates {
            partial: PlanTemplate::new(partial)?,
            combine: PlanTemplate::new(op.combine_plan(vec![])?)?,
            view: PlanTemplate::new(op.view_plan(vec![])?)?,
        });
        Ok(op)
    }

    pub(crate) fn aggregate(&self) -> &AggregatePlan {
        &self.aggregate
    }

    /// The key columns the shuffle hashes. In sliding mode all panes of a group must
    /// meet in one partition, so the window columns are left out.
    fn shuffle_keys(&self) -> Vec<usize> {
        let aggregate = self.aggregate();
        (0..self.keys)
            .filter(|k| {
                !self.sliding
                    || (Some(*k) != aggregate.window_start_key
                        && Some(*k) != aggregate.window_end_key)
            })
            .collect()
    }

    /// A filter over the map's input that keeps the rows whose groups go to a
    /// `wanted` partition, when a row's shuffle key is a function of the row alone:
    /// always, except for hopping windows outside sliding mode, whose window columns
    /// (part of the key there) are given to a row by the pane expansion after the
    /// partial aggregate. `None` when every partition is wanted or there is no key.
    fn partition_filter(&self, keys: &[usize], wanted: &Wanted) -> Option<Expr> {
        let Wanted::Only(list) = wanted else {
            return None;
        };
        let hopping = self
            .plan
            .window
            .as_ref()
            .is_some_and(|w| w.kind == WindowKind::Hop);
        if keys.is_empty() || (hopping && !self.sliding) {
            return None;
        }
        let exprs = &self.aggregate().group_exprs;
        let keys: Option<Vec<Expr>> = keys.iter().map(|k| exprs.get(*k).cloned()).collect();
        Some(in_partitions(keys?, self.plan.partitions, list.clone()))
    }

    /// The partial aggregate of `input` in the state layout.
    fn partial_plan(&self, input: LogicalPlan) -> Result<LogicalPlan> {
        let aggregate = self.aggregate();
        let groups: Vec<Expr> = aggregate
            .group_exprs
            .iter()
            .enumerate()
            .map(|(i, e)| e.clone().alias(key_name(i)))
            .collect();
        let mut aggs = Vec::new();
        let mut projection: Vec<Expr> = (0..self.keys).map(|i| column(&key_name(i))).collect();
        for (i, call) in aggregate.calls.iter().enumerate() {
            let arg = call.arg.clone();
            let mut add = |name: String, e: Expr| {
                aggs.push(e.alias(name.clone()));
                projection.push(column(&name));
            };
            match call.kind {
                AggregateKind::Count => add(format!("__a{i}_n"), count(arg)),
                AggregateKind::Sum | AggregateKind::Avg => {
                    add(format!("__a{i}_s"), sum(arg.clone()));
                    add(format!("__a{i}_n"), count(arg));
                }
                AggregateKind::Min => add(format!("__a{i}_m"), min(arg)),
                AggregateKind::Max => add(format!("__a{i}_m"), max(arg)),
                AggregateKind::CountDistinct => {
                    projection.push(lit(0i64).alias(format!("__a{i}_n")));
                }
            }
        }
        aggs.push(count(lit(1i64)).alias(ROWS));
        projection.push(column(ROWS));
        Ok(LogicalPlanBuilder::from(input)
            .aggregate(groups, aggs)?
            .project(projection)?
            .build()?)
    }

    /// The distinct (keys, value) pairs of `count(DISTINCT ...)` call `call`.
    fn distinct_plan(&self, input: LogicalPlan, call: usize) -> Result<LogicalPlan> {
        let aggregate = self.aggregate();
        let arg = aggregate
            .calls
            .get(call)
            .ok_or_else(|| Error::Internal(format!("no aggregate call {call}")))?
            .arg
            .clone();
        let mut groups: Vec<Expr> = aggregate
            .group_exprs
            .iter()
            .enumerate()
            .map(|(i, e)| e.clone().alias(key_name(i)))
            .collect();
        groups.push(arg.clone().alias("__v"));
        Ok(LogicalPlanBuilder::from(input)
            .filter(arg.is_not_null())?
            .aggregate(groups, Vec::<Expr>::new())?
            .build()?)
    }

    /// For HOP: adds each pane's rows to every window containing the pane, as one
    /// cross join with the `size / slide` shifts from a pane to its windows (a plan
    /// of the same size however many windows a pane is in).
    fn expand_panes(&self, plan: LogicalPlan) -> Result<LogicalPlan> {
        let Some(window) = self
            .plan
            .window
            .as_ref()
            .filter(|w| w.kind == WindowKind::Hop)
        else {
            return Ok(plan);
        };
        let aggregate = self.aggregate();
        let slide = i64::try_from(window.slide.as_nanos())
            .map_err(|_| Error::Internal("HOP slide out of range".into()))?;
        let size = i64::try_from(window.size.as_nanos())
            .map_err(|_| Error::Internal("HOP size out of range".into()))?;
        let interval = |nanos: i64| lit(ScalarValue::new_interval_mdn(0, 0, nanos));
        // Window i of a pane starts i slides before the pane and ends size - slide
        // - i slides after the pane's end.
        let shifts = (0..window.panes_per_window() as i64)
            .map(|i| {
                let back = i.saturating_mul(slide);
                // back <= size - slide: a pane is in size / slide windows.
                let ahead = size.saturating_sub(slide).saturating_sub(back);
                vec![interval(back), interval(ahead)]
            })
            .collect::<Vec<_>>();
        if shifts.is_empty() {
            return Err(Error::Internal("HOP window without panes".into()));
        }
        const SHIFTS: &str = "__window_shifts";
        let shift = |name: &str| Expr::Column(Column::new(Some(SHIFTS), name));
        let shifts = LogicalPlanBuilder::values(shifts)?.alias(SHIFTS)?.build()?;
        let projection: Vec<Expr> = plan
            .schema()
            .fields()
            .iter()
            .enumerate()
            .map(|(idx, field)| {
                let c = Expr::Column(Column::from_name(field.name()));
                if Some(idx) == aggregate.window_start_key {
                    (c - shift("column1")).alias(field.name())
                } else if Some(idx) == aggregate.window_end_key {
                    (c + shift("column2")).alias(field.name())
                } else {
                    c
                }
            })
            .collect();
        Ok(LogicalPlanBuilder::from(plan)
            .cross_join(shifts)?
            .project(projection)?
            .build()?)
    }

    /// Merges accumulator rows with the same keys.
    pub(crate) fn combine_plan(&self, rows: Vec<RecordBatch>) -> Result<LogicalPlan> {
        let fields = self.state_schema.fields();
        let groups: Vec<Expr> = (0..self.keys).map(|i| column(&key_name(i))).collect();
        let aggs_plain: Vec<Expr> = self
            .combine
            .iter()
            .zip(fields.iter().skip(self.keys))
            .map(|(how, field)| {
                let c = column(field.name());
                match how {
                    Combine::Sum => sum(c),
                    Combine::Min => min(c),
                    Combine::Max => max(c),
                }
                .alias(field.name())
            })
            .collect();
        let mut projection = groups.clone();
        projection.extend(
            fields
                .iter()
                .skip(self.keys)
                .map(|f| cast(column(f.name()), f.data_type().clone()).alias(f.name())),
        );
        Ok(scan("state", self.state_schema.clone(), rows)?
            .aggregate(groups, aggs_plain)?
            .project(projection)?
            .build()?)
    }

    /// Rows of `rows` whose keys appear in `touched`.
    fn semi_join(&self, rows: Vec<RecordBatch>, touched: &[RecordBatch]) -> Result<LogicalPlan> {
        let keys: Vec<String> = (0..self.keys).map(key_name).collect();
        let key_fields = self
            .state_schema
            .fields()
            .get(..self.keys)
            .ok_or_else(|| Error::Internal("state schema without its key columns".into()))?;
        let touched_schema = Arc::new(Schema::new(key_fields.to_vec()));
        let touched_plan = scan("touched", touched_schema, touched.to_vec())?.build()?;
        Ok(scan("state", self.state_schema.clone(), rows)?
            .join_detailed(
                touched_plan,
                JoinType::LeftSemi,
                (
                    keys.iter()
                        .map(|k| Column::new(Some("state"), k))
                        .collect::<Vec<_>>(),
                    keys.iter()
                        .map(|k| Column::new(Some("touched"), k))
                        .collect::<Vec<_>>(),
                ),
                None,
                NullEquality::NullEqualsNull,
            )?
            .build()?)
    }

    /// The view rows of accumulator rows: finalize each aggregate, then apply what the
    /// query does above its aggregation (HAVING, the select list).
    pub(crate) fn view_plan(&self, rows: Vec<RecordBatch>) -> Result<LogicalPlan> {
        let aggregate = self.aggregate();
        let out = &aggregate.output_schema;
        let mut exprs = Vec::new();
        for i in 0..self.keys {
            exprs.push(column(&key_name(i)));
        }
        for (i, call) in aggregate.calls.iter().enumerate() {
            let n = || column(&format!("__a{i}_n"));
            let s = || column(&format!("__a{i}_s"));
            let e = match call.kind {
                AggregateKind::Count | AggregateKind::CountDistinct => n(),
                AggregateKind::Sum => {
                    when(n().eq(lit(0i64)), lit(ScalarValue::Null)).otherwise(s())?
                }
                AggregateKind::Avg => when(n().eq(lit(0i64)), lit(ScalarValue::Null))
                    .otherwise(cast(s(), DataType::Float64) / cast(n(), DataType::Float64))?,
                AggregateKind::Min | AggregateKind::Max => column(&format!("__a{i}_m")),
            };
            exprs.push(e);
        }
        let exprs: Vec<Expr> = exprs
            .into_iter()
            .zip(out.iter())
            .map(|(e, (qualifier, field))| {
                cast(e, field.data_type().clone()).alias_qualified(qualifier.cloned(), field.name())
            })
            .collect();
        let finalized = scan("state", self.state_schema.clone(), rows)?
            .project(exprs)?
            .build()?;
        let replaced = self
            .plan
            .logical
            .clone()
            .transform_down(|node| match node {
                LogicalPlan::Aggregate(_) => Ok(Transformed::new(
                    finalized.clone(),
                    true,
                    TreeNodeRecursion::Jump,
                )),
                other => Ok(Transformed::no(other)),
            })?;
        Ok(replaced.data)
    }

    /// A predicate over state rows: the row's window has closed at watermark `wm`.
    pub(crate) fn closed_predicate(&self, wm: i64) -> Result<Expr> {
        let aggregate = self.aggregate();
        let window = self
            .plan
            .window
            .as_ref()
            .ok_or_else(|| Error::Internal("window close without a window".into()))?;
        let wm = lit(ScalarValue::TimestampNanosecond(Some(wm), None));
        Ok(
            match (aggregate.window_end_key, aggregate.window_start_key) {
                (Some(end), _) => column(&key_name(end)).lt_eq(wm),
                (None, Some(start)) => (column(&key_name(start))
                    + lit(ScalarValue::new_interval_mdn(
                        0,
                        0,
                        window.size.as_nanos() as i64,
                    )))
                .lt_eq(wm),
                (None, None) => {
                    return Err(Error::Internal("window close without window keys".into()));
                }
            },
        )
    }

    /// Folds the distinct pairs of one interval into the distinct state of one call and
    /// returns (new distinct state, count contributions in the state layout).
    async fn fold_distinct(
        &self,
        ctx: &SessionContext,
        call: usize,
        schema: &SchemaRef,
        old: &[RecordBatch],
        pieces: Vec<RecordBatch>,
    ) -> Result<(Vec<RecordBatch>, Vec<RecordBatch>)> {
        if pieces.is_empty() {
            return Ok((old.to_vec(), vec![]));
        }
        let names: Vec<String> = schema.fields().iter().map(|f| f.name().clone()).collect();
        let pairs = scan("pairs", schema.clone(), pieces)?
            .aggregate(
                names.iter().map(|n| column(n)).collect::<Vec<_>>(),
                Vec::<Expr>::new(),
            )?
            .build()?;
        let seen = scan("seen", schema.clone(), old.to_vec())?.build()?;
        let fresh = LogicalPlanBuilder::from(pairs)
            .alias("pairs")?
            .join_detailed(
                seen,
                JoinType::LeftAnti,
                (
                    names
                        .iter()
                        .map(|n| Column::new(Some("pairs"), n))
                        .collect::<Vec<_>>(),
                    names
                        .iter()
                        .map(|n| Column::new(Some("seen"), n))
                        .collect::<Vec<_>>(),
                ),
                None,
                NullEquality::NullEqualsNull,
            )?
            .build()?;
        let fresh: Vec<RecordBatch> = execute(ctx, fresh)
            .await?
            .iter()
            .map(|b| relabel(b, schema))
            .collect::<Result<_>>()?;
        let mut state = old.to_vec();
        state.extend(fresh.iter().cloned());
        // Contributions: one row per group with the number of new distinct values.
        let target = format!("__a{call}_n");
        let groups: Vec<Expr> = (0..self.keys).map(|i| column(&key_name(i))).collect();
        let mut projection: Vec<Expr> = groups.clone();
        for field in self.state_schema.fields().iter().skip(self.keys) {
            let e = if *field.name() == target {
                column("__new")
            } else if field.name() == ROWS {
                lit(0i64)
            } else {
                lit(ScalarValue::try_from(field.data_type())?)
            };
            projection.push(cast(e, field.data_type().clone()).alias(field.name()));
        }
        let contributions = scan("fresh", schema.clone(), fresh)?
            .aggregate(groups, vec![count(lit(1i64)).alias("__new")])?
            .project(projection)?
            .build()?;
        let contributions = execute(ctx, contributions).await?;
        Ok((state, contributions))
    }
}

/// State rows of groups that still have input rows (`__rows` is not 0).
fn without_empty_groups(rows: &[RecordBatch]) -> Result<Vec<RecordBatch>> {
    let mut out = Vec::with_capacity(rows.len());
    for batch in rows {
        let counts = batch
            .column_by_name(ROWS)
            .and_then(|c| c.as_primitive_opt::<arrow::datatypes::Int64Type>())
            .ok_or_else(|| Error::Internal("state rows without their row count".into()))?;
        let mask: arrow::array::BooleanArray =
            counts.iter().map(|n| Some(n.unwrap_or(0) != 0)).collect();
        let kept = filter_record_batch(batch, &mask)?;
        if kept.num_rows() > 0 {
            out.push(kept);
        }
    }
    Ok(out)
}

impl AggregateOperator {
    /// The state after an interval: the accumulators and the distinct pairs.
    fn next_state(
        &self,
        accumulators: Vec<RecordBatch>,
        distinct: Vec<(String, Vec<RecordBatch>)>,
        watermark: Option<i64>,
    ) -> StatePartition {
        let mut state = StatePartition {
            watermark,
            ..StatePartition::default()
        };
        state.set(ACCUMULATORS, accumulators);
        for (table, pairs) in distinct {
            state.set(&table, pairs);
        }
        state
    }
}

/// The schema of the scanned source, as the input plan expects it.
fn plan_source_schema(plan: &StreamPlan) -> Result<Schema> {
    let mut found = None;
    plan.input.apply(|node| {
        if let LogicalPlan::TableScan(scan) = node
            && scan.table_name.table() == plan.source
        {
            found = Some(scan.source.schema());
            return Ok(TreeNodeRecursion::Stop);
        }
        Ok(TreeNodeRecursion::Continue)
    })?;
    found
        .map(|s| s.as_ref().clone())
        .ok_or_else(|| Error::Internal(format!("plan does not scan {}", plan.source)))
}

#[async_trait]
impl MapOperator for AggregateOperator {
    async fn map_block(
        &self,
        ctx: &SessionContext,
        block: &Block,
        wanted: &Wanted,
    ) -> Result<Vec<ShufflePiece>> {
        let p = self.plan.partitions;
        let keys = self.shuffle_keys();
        let prefilter = self.partition_filter(&keys, wanted);
        let (input, mut rows) = self
            .partial_of(ctx, block, block.batches.clone(), prefilter.as_ref())
            .await?;
        if !block.deletes.is_empty() {
            // Rows the input deleted: their partials count negatively (the planner
            // keeps this operator for invertible aggregates over such input).
            let (_, deleted) = self
                .partial_of(ctx, block, block.deletes.clone(), prefilter.as_ref())
                .await?;
            for batch in deleted {
                rows.push(self.negated(&batch)?);
            }
        }
        let mut pieces: Vec<ShufflePiece> = hash_partition(&rows, &keys, p, wanted)?
            .into_iter()
            .map(|rows| ShufflePiece {
                rows,
                distinct: Vec::with_capacity(self.distinct_schemas.len()),
            })
            .collect();
        // Each piece's `distinct` lists the calls' pairs in call order.
        for (call, _) in &self.distinct_schemas {
            let pairs = self.expand_panes(self.distinct_plan(input.clone(), *call)?)?;
            let pairs = execute(ctx, pairs).await?;
            for (piece, part) in pieces
                .iter_mut()
                .zip(hash_partition(&pairs, &keys, p, wanted)?)
            {
                piece.distinct.push(part);
            }
        }
        Ok(pieces)
    }
}

#[async_trait]
impl StreamOperator for AggregateOperator {
    fn state(&self) -> Vec<StateTable> {
        let mut tables = vec![StateTable::new(
            ACCUMULATORS,
            "the accumulators of every group (of every open window)",
        )];
        if self.sliding {
            tables.push(StateTable::new(
                RUNNING,
                "the running values of the last window emitted, per group",
            ));
        }
        for d in 0..self.distinct_schemas.len() {
            tables.push(StateTable::new(
                distinct_table(d),
                "the distinct (group, value) pairs of one count(DISTINCT)",
            ));
        }
        tables
    }

    async fn process_interval(
        &self,
        ctx: &SessionContext,
        input: PartitionInput,
    ) -> Result<PartitionOutput> {
        let prev = input.state;
        if self.plan.retracting_input && !self.distinct_schemas.is_empty() {
            return Err(Error::Internal(
                "count(DISTINCT) is not maintained over input that deletes rows".into(),
            ));
        }
        let mut delta: Vec<RecordBatch> = Vec::new();
        let mut distinct_state = Vec::new();
        for piece in &input.pieces {
            for b in &piece.rows {
                delta.push(relabel(b, &self.state_schema)?);
            }
        }
        for (d, (call, schema)) in self.distinct_schemas.iter().enumerate() {
            let mut pieces: Vec<RecordBatch> = Vec::new();
            for piece in &input.pieces {
                let rows = piece.distinct.get(d).ok_or_else(|| {
                    Error::Internal(format!("a shuffle piece without count(DISTINCT) rows {d}"))
                })?;
                for b in rows {
                    pieces.push(relabel(b, schema)?);
                }
            }
            let old = prev.table(&distinct_table(d));
            let (state, contributions) =
                self.fold_distinct(ctx, *call, schema, old, pieces).await?;
            distinct_state.push((distinct_table(d), state));
            for b in &contributions {
                delta.push(relabel(b, &self.state_schema)?);
            }
        }

        let closing = self.plan.emit == EmitMode::OnWindowClose;
        if delta.is_empty() && (!closing || prev.unchanged_by(input.watermark)) {
            return Ok(PartitionOutput::unchanged(prev));
        }

        if self.sliding {
            return self.slide(ctx, prev, delta, input.watermark).await;
        }
        let mut all = prev.table(ACCUMULATORS).to_vec();
        all.extend(delta.iter().cloned());
        let merged = if delta.is_empty() {
            prev.table(ACCUMULATORS).to_vec()
        } else {
            let merged = self.combine(ctx, all).await?;
            let merged = merged
                .iter()
                .map(|b| relabel(b, &self.state_schema))
                .collect::<Result<Vec<_>>>()?;
            if self.plan.retracting_input {
                // A group whose rows were all deleted is gone.
                without_empty_groups(&merged)?
            } else {
                merged
            }
        };

        if closing {
            let wm = input.watermark.unwrap_or(i64::MIN);
            let (closed, open) = self.split_closed(ctx, &merged, wm)?;
            let emitted = if closed.is_empty() {
                vec![]
            } else {
                self.view(ctx, closed).await?
            };
            return Ok(PartitionOutput {
                state: Arc::new(self.next_state(open, distinct_state, input.watermark)),
                view: ViewUpdate::Append(emitted.clone()),
                changelog: Changelog {
                    deletes: vec![],
                    inserts: emitted,
                },
            });
        }

        // The groups this interval touched, before and after. Without group keys there
        // is one group, and it is always touched.
        let (before, after) = if self.keys == 0 {
            (prev.table(ACCUMULATORS).to_vec(), merged.clone())
        } else {
            let keys: Vec<Expr> = (0..self.keys).map(|i| column(&key_name(i))).collect();
            let touched = scan("delta", self.state_schema.clone(), delta)?
                .aggregate(keys, Vec::<Expr>::new())?
                .build()?;
            let touched = execute(ctx, touched).await?;
            (
                execute(
                    ctx,
                    self.semi_join(prev.table(ACCUMULATORS).to_vec(), &touched)?,
                )
                .await?,
                execute(ctx, self.semi_join(merged.clone(), &touched)?).await?,
            )
        };
        let before_rows = self.finalize(ctx, before).await?;
        let after_rows = self.finalize(ctx, after).await?;
        let changelog = Changelog::between(&self.plan.schema, before_rows, after_rows)?;
        let view = self.finalize(ctx, merged.clone()).await?;
        Ok(PartitionOutput {
            state: Arc::new(self.next_state(merged, distinct_state, input.watermark)),
            view: ViewUpdate::Replace(view),
            changelog,
        })
    }
}

impl AggregateOperator {
    async fn finalize(
        &self,
        ctx: &SessionContext,
        rows: Vec<RecordBatch>,
    ) -> Result<Vec<RecordBatch>> {
        if rows.iter().all(|b| b.num_rows() == 0) {
            return Ok(vec![]);
        }
        let rows = rows
            .iter()
            .map(|b| relabel(b, &self.state_schema))
            .collect::<Result<Vec<_>>>()?;
        let out = self.view(ctx, rows).await?;
        out.iter().map(|b| relabel(b, &self.plan.schema)).collect()
    }

    /// The stateless input over `batches` of `block`'s input (bound to its scan),
    /// filtered by `prefilter`, and its partial aggregate in the state layout.
    async fn partial_of(
        &self,
        ctx: &SessionContext,
        block: &Block,
        batches: Vec<RecordBatch>,
        prefilter: Option<&Expr>,
    ) -> Result<(LogicalPlan, Vec<RecordBatch>)> {
        let mut input = bind_scan(
            &self.plan.input,
            &block.source,
            block.schema.clone(),
            batches.clone(),
        )?;
        if let Some(filter) = prefilter {
            input = LogicalPlanBuilder::from(input)
                .filter(filter.clone())?
                .build()?;
        }
        let rows = match (&self.templates, prefilter) {
            (Some(t), None) => {
                let source = (block.source.as_str(), block.schema.clone(), batches);
                t.partial.execute(ctx, vec![source]).await?
            }
            _ => {
                let mut partial = self.partial_plan(input.clone())?;
                if !self.sliding {
                    partial = self.expand_panes(partial)?;
                }
                execute(ctx, partial).await?
            }
        };
        Ok((input, rows))
    }

    /// Partial rows that subtract what `batch` adds: every accumulator negated (the
    /// counts and sums of invertible aggregates, and `__rows`).
    fn negated(&self, batch: &RecordBatch) -> Result<RecordBatch> {
        let columns = batch
            .columns()
            .iter()
            .enumerate()
            .map(|(i, c)| {
                if i < self.keys {
                    Ok(c.clone())
                } else {
                    arrow::compute::kernels::numeric::neg(c.as_ref())
                }
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Ok(RecordBatch::try_new(batch.schema(), columns)?)
    }

    /// Runs [`AggregateOperator::combine_plan`] over `rows`.
    pub(crate) async fn combine(
        &self,
        ctx: &SessionContext,
        rows: Vec<RecordBatch>,
    ) -> Result<Vec<RecordBatch>> {
        let template = self.templates.as_ref().map(|t| &t.combine);
        self.over_state(ctx, template, Self::combine_plan, rows)
            .await
    }

    /// Runs [`AggregateOperator::view_plan`] over `rows`.
    pub(crate) async fn view(
        &self,
        ctx: &SessionContext,
        rows: Vec<RecordBatch>,
    ) -> Result<Vec<RecordBatch>> {
        let template = self.templates.as_ref().map(|t| &t.view);
        self.over_state(ctx, template, Self::view_plan, rows).await
    }

    /// Runs a plan over state rows: its template with `rows` bound to `state`, or,
    /// without one, the plan `build` makes over them.
    async fn over_state(
        &self,
        ctx: &SessionContext,
        template: Option<&PlanTemplate>,
        build: fn(&Self, Vec<RecordBatch>) -> Result<LogicalPlan>,
        rows: Vec<RecordBatch>,
    ) -> Result<Vec<RecordBatch>> {
        match template {
            Some(t) => {
                let state = ("state", self.state_schema.clone(), rows);
                t.execute(ctx, vec![state]).await
            }
            None => execute(ctx, build(self, rows)?).await,
        }
    }

    /// Splits state rows into those whose window has closed at watermark `wm` and
    /// the rest. A row whose window end is NULL is in neither (it has no window).
    fn split_closed(
        &self,
        ctx: &SessionContext,
        rows: &[RecordBatch],
        wm: i64,
    ) -> Result<(Vec<RecordBatch>, Vec<RecordBatch>)> {
        let schema = DFSchema::try_from(self.state_schema.as_ref().clone())?;
        let predicate = ctx.create_physical_expr(self.closed_predicate(wm)?, &schema)?;
        let (mut closed, mut open) = (Vec::new(), Vec::new());
        for batch in rows {
            let batch = relabel(batch, &self.state_schema)?;
            let mask = predicate.evaluate(&batch)?.into_array(batch.num_rows())?;
            let mask = mask.as_boolean();
            for (kept, out) in [(mask.clone(), &mut closed), (not_mask(mask)?, &mut open)] {
                let part = filter_record_batch(&batch, &kept)?;
                if part.num_rows() > 0 {
                    out.push(part);
                }
            }
        }
        Ok((closed, open))
    }
}
