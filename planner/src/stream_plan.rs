//! One stage of a view's dataflow: a stream plan.
//!
//! [`crate::dataflow::plan_dataflow`] cuts a view's query into stages, one per stateful
//! operator; [`plan_stage`] compiles each into a [`StreamPlan`]: the DataFusion
//! logical plan of the stage, split into
//! - the **input**: the stateless part (scan, filter, projection, join with static
//!   tables), run over each interval's new rows of the relation the stage reads — a
//!   source, another view, or the stage before it;
//! - the **operator** that keeps state, one of
//!   - the incremental **aggregate** ([`AggregatePlan`]): group keys and aggregate
//!     calls, maintained as accumulators (partial aggregate per block, shuffle by key,
//!     merge per partition), for a stage whose input only ever grows;
//!   - the **keyed** operator ([`KeyedPlan`]): the stage's input rows kept per key,
//!     and the operator recomputed for the keys an interval touched — any aggregate,
//!     `DISTINCT`, top-N, window functions, and every stage whose input retracts rows;
//!   - none: a stateless stage appends its rows;
//! - the **output**: what lies above the operator (HAVING, the select list), applied
//!   to the operator's rows to produce the stage's rows.
//!
//! The executor instantiates each stage at every interval as a map stage, an
//! exchange and a reduce stage ([`crate::stage_dag`]).

use std::sync::Arc;
use std::time::Duration;

use arrow::datatypes::{DataType, FieldRef, SchemaRef};
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{Column, DFSchemaRef, ScalarValue};
use datafusion::logical_expr::expr::{Sort as SortExpr, WindowFunction};
use datafusion::logical_expr::utils::split_conjunction;
use datafusion::logical_expr::{
    Aggregate, Distinct, Expr, FetchType, JoinType, Limit, LogicalPlan, LogicalPlanBuilder,
    Operator, SkipType, Sort, Window, lit, when,
};

use crate::catalog::{Catalog, CatalogObject};
use crate::duration::format_duration;
use crate::error::{Error, Result, invalid, unsupported};
use crate::statement::EmitMode;
use crate::window::{WindowKind, WindowSpec};

/// The compiled form of one stage of a continuous query.
#[derive(Clone, Debug)]
pub struct StreamPlan {
    /// The relation this stage maintains: the view's name for its last stage, and
    /// `view#i` for the stages before it.
    pub name: String,
    /// The view the stage belongs to.
    pub view: String,
    /// The stream the stage reads: a source, another view, or an earlier stage (the
    /// first of `inputs`).
    pub source: String,
    /// Every stream the stage reads, `source` first: several with `UNION ALL`.
    pub inputs: Vec<String>,
    /// Every catalog object the stage reads (sources, views and tables; not stages).
    pub reads: Vec<String>,
    pub window: Option<WindowSpec>,
    pub emit: EmitMode,
    /// The stage's query, analyzed (types coerced), not optimized, over a scan of
    /// `source`.
    pub logical: LogicalPlan,
    /// The stateless part, run over one interval's rows of `source`.
    pub input: LogicalPlan,
    /// The incremental aggregation, if the stage has one.
    pub aggregate: Option<AggregatePlan>,
    /// The keyed operator, if the stage has one.
    pub keyed: Option<KeyedPlan>,
    /// Whether the stage's input retracts rows (has deletions).
    pub retracting_input: bool,
    /// Whether the stage's output retracts rows: an aggregate that emits updates, and
    /// every keyed operator, delete the rows they replace.
    pub retracts: bool,
    /// The schema of the stage's rows.
    pub schema: SchemaRef,
    /// Number of state partitions (P).
    pub partitions: usize,
}

/// The aggregation of a stream plan.
#[derive(Clone, Debug)]
pub struct AggregatePlan {
    /// Group key expressions over `input`'s schema.
    pub group_exprs: Vec<Expr>,
    /// Aggregate calls, in the order of the aggregate's output columns.
    pub calls: Vec<AggregateCall>,
    /// Schema of the aggregate's output: group keys then aggregate values.
    pub output_schema: DFSchemaRef,
    /// Which group key is `window_start`, for windowed aggregations.
    pub window_start_key: Option<usize>,
    /// Which group key is `window_end`, for windowed aggregations.
    pub window_end_key: Option<usize>,
}

impl AggregatePlan {
    /// Whether every aggregate can be un-applied exactly: sliding windows are then
    /// maintained by adding the newest pane and subtracting the expired one.
    pub fn invertible(&self) -> bool {
        self.calls.iter().all(|c| c.invertible)
    }
}

/// What a keyed operator computes for each key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyedKind {
    /// `GROUP BY`: aggregates of the rows of each group.
    Aggregate,
    /// `SELECT DISTINCT`: each distinct row once.
    Distinct,
    /// `ORDER BY ... LIMIT n`: the first rows of all.
    TopN,
    /// Window functions (`ROW_NUMBER() OVER (PARTITION BY ...)`): over the rows of
    /// each partition.
    Window,
    /// A stateless stage over input that retracts rows: its rows, as they are.
    Rows,
}

impl KeyedKind {
    pub fn describe(self) -> &'static str {
        match self {
            KeyedKind::Aggregate => "aggregate",
            KeyedKind::Distinct => "distinct",
            KeyedKind::TopN => "top-N",
            KeyedKind::Window => "window functions",
            KeyedKind::Rows => "rows",
        }
    }
}

/// The name of the scan of the rows a keyed operator keeps, in [`KeyedPlan::reduce`].
pub const KEPT: &str = "__kept";

/// A keyed operator: the rows of its input are kept per key, as a multiset, and every
/// interval the operator (and what lies above it in the stage) is computed again for
/// the keys the interval's input touched, before and after the change. The
/// difference is the stage's changelog. Exact for any operator whose result for a key
/// depends on that key's rows alone, retractions included.
#[derive(Clone, Debug)]
pub struct KeyedPlan {
    pub kind: KeyedKind,
    /// Over one block of the stage's input: the rows kept, as columns `__c0 ..`,
    /// followed by the key columns `__k0 ..`.
    pub map: LogicalPlan,
    /// The key expressions, over the operator's input (for EXPLAIN); none: all rows
    /// are one key, in one partition.
    pub keys: Vec<Expr>,
    /// The operator and everything above it in the stage, over a scan of the kept
    /// rows of some keys named [`KEPT`] (the schema of `map`).
    pub reduce: LogicalPlan,
    /// Over the same scan: the kept rows still worth keeping, when the input only
    /// inserts and the operator can only ever need some of them — a top-N needs its
    /// first n rows, since a row outside them now is outside them for good. `None`:
    /// every row is kept.
    pub prune: Option<LogicalPlan>,
}

/// The aggregate functions dstream maintains incrementally.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AggregateKind {
    Count,
    CountDistinct,
    Sum,
    Min,
    Max,
    Avg,
}

impl AggregateKind {
    pub fn name(self) -> &'static str {
        match self {
            AggregateKind::Count => "count",
            AggregateKind::CountDistinct => "count distinct",
            AggregateKind::Sum => "sum",
            AggregateKind::Min => "min",
            AggregateKind::Max => "max",
            AggregateKind::Avg => "avg",
        }
    }
}

/// One aggregate call: function, argument and the type of its result.
#[derive(Clone, Debug)]
pub struct AggregateCall {
    pub kind: AggregateKind,
    pub arg: Expr,
    pub output: FieldRef,
    /// Whether the call can be un-applied exactly: `count`, and `sum`/`avg` of integers
    /// or decimals. Floating-point sums are not: subtracting accumulates rounding
    /// error, and one infinity would poison the group for good.
    pub invertible: bool,
}

/// What a stage is planned against: the catalog, the stages before it, and the
/// view's window and emit mode.
pub(crate) struct StageContext<'a> {
    pub catalog: &'a Catalog,
    pub view: &'a str,
    pub stages: &'a [Arc<StreamPlan>],
    pub window: Option<&'a WindowSpec>,
    pub emit: EmitMode,
    pub partitions: usize,
}

/// Compiles one stage, `logical`, named `name`.
pub(crate) fn plan_stage(
    cx: &StageContext<'_>,
    name: String,
    logical: LogicalPlan,
) -> Result<StreamPlan> {
    let inputs = resolve_reads(&logical, cx)?;
    check_supported(&logical)?;
    let source = inputs
        .streams
        .first()
        .cloned()
        .ok_or_else(|| Error::Internal("a stage without a stream".into()))?;
    check_joins(&logical, &inputs.streams)?;
    // The window belongs to the stage that reads its source; EMIT ON WINDOW CLOSE to
    // that stage too (later stages see only closed windows, and emit updates).
    let window = cx
        .window
        .filter(|w| inputs.streams.contains(&w.source))
        .cloned();
    if window.is_some() && inputs.streams.len() > 1 {
        return Err(unsupported(
            "a window over one of several streams read with UNION ALL; window the \
             streams in views of their own, and read those",
        ));
    }
    let emit = match &window {
        Some(_) => cx.emit,
        None => EmitMode::OnUpdate,
    };
    let schema = Arc::new(logical.schema().as_arrow().clone());
    let mut plan = StreamPlan {
        name,
        view: cx.view.to_string(),
        source,
        inputs: inputs.streams,
        reads: inputs.reads,
        window,
        emit,
        input: logical.clone(),
        logical: logical.clone(),
        aggregate: None,
        keyed: None,
        retracting_input: inputs.retracting,
        retracts: inputs.retracting,
        schema,
        partitions: cx.partitions,
    };
    let operator = find_operator(&logical)?;
    // An aggregate over input that only grows is maintained as accumulators, when
    // every call has an incremental form.
    if let Some(LogicalPlan::Aggregate(agg)) = operator {
        match aggregate_plan(agg, plan.window.as_ref()) {
            // Over input that deletes rows, only aggregates that can be un-applied
            // (count, and sum and avg of exact numbers) stay accumulators: a deleted
            // row's partial is subtracted.
            Ok(aggregate)
                if inputs.retracting
                    && !aggregate.calls.iter().all(|c| {
                        c.invertible
                            && matches!(
                                c.kind,
                                AggregateKind::Count | AggregateKind::Sum | AggregateKind::Avg
                            )
                    }) => {}
            Ok(aggregate) => {
                plan.input = agg.input.as_ref().clone();
                check_aggregate(&plan, &aggregate)?;
                plan.retracts = plan.emit != EmitMode::OnWindowClose;
                plan.aggregate = Some(aggregate);
                return Ok(plan);
            }
            Err(Error::Unsupported(_)) if !hopping(&plan) => {}
            Err(e) => return Err(e),
        }
    }
    match (operator, &plan.window) {
        (None, Some(w)) if w.kind == WindowKind::Hop => {
            return Err(unsupported(
                "HOP windows need an aggregation: GROUP BY window_start, window_end, ...",
            ));
        }
        (Some(_), Some(w)) if w.kind == WindowKind::Hop => {
            return Err(unsupported(
                "this query over a HOP window; a HOP window is read by an aggregation \
                 with count, sum, min, max and avg, grouped by window_start or window_end",
            ));
        }
        _ => {}
    }
    if plan.emit == EmitMode::OnWindowClose {
        return Err(invalid(
            "EMIT ON WINDOW CLOSE needs a windowed aggregation with count, sum, min, max \
             or avg: GROUP BY window_start, window_end, ... over TUMBLE or HOP",
        ));
    }
    if operator.is_none() && !inputs.retracting {
        // Stateless over input that only grows: the stage appends its rows.
        return Ok(plan);
    }
    let mut keyed = keyed_plan(&logical, operator)?;
    if inputs.retracting {
        // A deleted row may bring back one that was cut.
        keyed.prune = None;
    }
    plan.input = keyed.map.clone();
    plan.keyed = Some(keyed);
    plan.retracts = true;
    Ok(plan)
}

fn hopping(plan: &StreamPlan) -> bool {
    plan.window
        .as_ref()
        .is_some_and(|w| w.kind == WindowKind::Hop)
}

/// The checks of an incremental aggregate: window close and HOP.
fn check_aggregate(plan: &StreamPlan, agg: &AggregatePlan) -> Result<()> {
    match (&plan.window, plan.emit) {
        (w, EmitMode::OnWindowClose)
            if w.is_none() || (agg.window_start_key.is_none() && agg.window_end_key.is_none()) =>
        {
            Err(invalid(
                "EMIT ON WINDOW CLOSE needs a windowed aggregation: \
                 GROUP BY window_start or window_end over TUMBLE or HOP",
            ))
        }
        (Some(w), _) if w.kind == WindowKind::Hop => {
            if agg.window_start_key.is_none() && agg.window_end_key.is_none() {
                return Err(invalid(
                    "a HOP window must be grouped by window_start or window_end",
                ));
            }
            check_hop_columns(&plan.input, agg)
        }
        _ => Ok(()),
    }
}

/// The relations a stage reads.
struct StageInputs {
    /// The streams: sources, views or earlier stages, in the order the plan reads
    /// them.
    streams: Vec<String>,
    /// Catalog objects read.
    reads: Vec<String>,
    /// Whether a stream retracts rows.
    retracting: bool,
}

/// Finds the stream and the tables the stage reads.
fn resolve_reads(plan: &LogicalPlan, cx: &StageContext<'_>) -> Result<StageInputs> {
    let mut scans: Vec<String> = Vec::new();
    plan.apply(|node| {
        if let LogicalPlan::TableScan(scan) = node {
            let name = scan.table_name.table().to_string();
            if !scans.contains(&name) {
                scans.push(name);
            }
        }
        Ok(TreeNodeRecursion::Continue)
    })?;
    let mut reads = Vec::new();
    let mut streams: Vec<(String, bool)> = Vec::new();
    for name in scans {
        if let Some(stage) = cx.stages.iter().find(|s| s.name == name) {
            streams.push((name, stage.retracts));
            continue;
        }
        match cx.catalog.get(&name) {
            Some(CatalogObject::Source(_)) => streams.push((name.clone(), false)),
            Some(CatalogObject::Table(_)) => {}
            Some(CatalogObject::View(v)) => {
                if v.name == cx.view {
                    return Err(invalid(format!("view \"{name}\" cannot read itself")));
                }
                streams.push((name.clone(), v.plan.retracts));
            }
            None => {
                return Err(unsupported(format!(
                    "a materialized view cannot read \"{name}\"; it reads sources, \
                     views and tables"
                )));
            }
        }
        reads.push(name);
    }
    if streams.is_empty() {
        return Err(invalid(
            "a materialized view must read a source or a view; to query tables alone, use SELECT",
        ));
    }
    Ok(StageInputs {
        retracting: streams.iter().any(|(_, r)| *r),
        streams: streams.into_iter().map(|(n, _)| n).collect(),
        reads,
    })
}

pub(crate) fn check_window(
    window: &WindowSpec,
    catalog: &Catalog,
    batch_interval: Duration,
    emit: EmitMode,
) -> Result<()> {
    let def = catalog.source(&window.source).ok_or_else(|| {
        invalid(format!(
            "the first argument of a window function must be a source; \"{}\" is not one",
            window.source
        ))
    })?;
    let field = def
        .schema
        .field_with_name(&window.time_column)
        .map_err(|_| {
            invalid(format!(
                "source \"{}\" has no column \"{}\" to window on",
                window.source, window.time_column
            ))
        })?;
    if !matches!(field.data_type(), DataType::Timestamp(_, _)) {
        return Err(invalid(format!(
            "window column \"{}\" must be a TIMESTAMP, not {}",
            window.time_column,
            field.data_type()
        )));
    }
    if window.is_processing_time() {
        for (what, d) in [("size", window.size), ("slide", window.slide)] {
            if d.as_nanos() % batch_interval.as_nanos() != 0 {
                return Err(invalid(format!(
                    "window {what} {} is not a multiple of the batch interval {}; \
                     processing-time windows are made of whole intervals",
                    format_duration(d),
                    format_duration(batch_interval)
                )));
            }
        }
    } else if emit == EmitMode::OnWindowClose {
        let has_watermark = def
            .watermark
            .as_ref()
            .is_some_and(|w| w.column == window.time_column);
        if !has_watermark {
            return Err(invalid(format!(
                "EMIT ON WINDOW CLOSE on event time needs a watermark: declare \
                 WATERMARK FOR {} AS ... on source \"{}\"",
                window.time_column, window.source
            )));
        }
    }
    Ok(())
}

/// Rejects constructs that have no streaming form (yet), naming them.
fn check_supported(plan: &LogicalPlan) -> Result<()> {
    let mut problem = None;
    plan.apply_with_subqueries(|node| {
        problem = match node {
            LogicalPlan::Limit(limit) => match limit.input.as_ref() {
                _ if limit.fetch.is_none() => Some("OFFSET without LIMIT".to_string()),
                LogicalPlan::Sort(_) => None,
                _ => Some("LIMIT without ORDER BY (which rows it keeps would be arbitrary)".into()),
            },
            LogicalPlan::Sort(sort) if sort.fetch.is_some() => None,
            LogicalPlan::Distinct(Distinct::On(_)) => Some("SELECT DISTINCT ON".into()),
            LogicalPlan::Subquery(_) => Some("subqueries in expressions".into()),
            LogicalPlan::RecursiveQuery(_) => Some("recursive queries".into()),
            LogicalPlan::Union(_) => None,
            _ => None,
        };
        match problem {
            Some(_) => Ok(TreeNodeRecursion::Stop),
            None => Ok(TreeNodeRecursion::Continue),
        }
    })?;
    if let Some(p) = problem {
        return Err(unsupported(format!(
            "{p} in materialized views is not supported"
        )));
    }
    // ORDER BY is kept only under a LIMIT: a top-N.
    let mut sorts = 0usize;
    let mut limited = 0usize;
    plan.apply(|node| {
        match node {
            LogicalPlan::Sort(_) => sorts = sorts.saturating_add(1),
            LogicalPlan::Limit(limit) if matches!(limit.input.as_ref(), LogicalPlan::Sort(_)) => {
                limited = limited.saturating_add(1)
            }
            _ => {}
        }
        Ok(TreeNodeRecursion::Continue)
    })?;
    if sorts > limited {
        return Err(unsupported(
            "ORDER BY without LIMIT in materialized views is not supported (a view is a \
             set of rows: order when you query it, or keep the first rows with LIMIT)",
        ));
    }
    Ok(())
}

/// Whether `node` keeps state in a stream: it computes over more than one row.
pub(crate) fn is_stateful(node: &LogicalPlan) -> bool {
    matches!(
        node,
        LogicalPlan::Aggregate(_)
            | LogicalPlan::Distinct(_)
            | LogicalPlan::Window(_)
            | LogicalPlan::Limit(_)
            | LogicalPlan::Sort(_)
    )
}

/// The stage's stateful operator: the first one below projections, filters and
/// aliases (the stage's output part). `None` for a stateless stage.
fn find_operator(plan: &LogicalPlan) -> Result<Option<&LogicalPlan>> {
    let mut node = plan;
    loop {
        match node {
            LogicalPlan::Aggregate(_)
            | LogicalPlan::Distinct(_)
            | LogicalPlan::Window(_)
            | LogicalPlan::Limit(_) => return Ok(Some(node)),
            LogicalPlan::Projection(_) | LogicalPlan::Filter(_) | LogicalPlan::SubqueryAlias(_) => {
                let [input] = *node.inputs().as_slice() else {
                    return Err(Error::Internal(
                        "a projection, filter or alias without exactly one input".into(),
                    ));
                };
                node = input;
            }
            _ => break,
        }
    }
    if node.exists(|n| Ok(is_stateful(n)))? {
        return Err(unsupported(
            "an aggregation, DISTINCT, LIMIT or window function below a join in a \
             materialized view",
        ));
    }
    Ok(None)
}

/// The columns of `schema`, qualified as they are.
fn columns(schema: &DFSchemaRef) -> Vec<Expr> {
    schema
        .iter()
        .map(|(q, f)| Expr::Column(Column::new(q.cloned(), f.name())))
        .collect()
}

/// Name of the `i`-th kept column of a keyed operator.
pub fn kept_column(i: usize) -> String {
    format!("__c{i}")
}

/// Name of the `i`-th key column of a keyed operator.
pub fn key_column(i: usize) -> String {
    format!("__k{i}")
}

/// The keyed form of a stage whose stateful operator is `operator` (none: a stateless
/// stage over input that retracts).
fn keyed_plan(logical: &LogicalPlan, operator: Option<&LogicalPlan>) -> Result<KeyedPlan> {
    let (kind, input, keys): (KeyedKind, &LogicalPlan, Vec<Expr>) = match operator {
        None => (KeyedKind::Rows, logical, columns(logical.schema())),
        Some(LogicalPlan::Aggregate(agg)) => {
            if agg
                .group_expr
                .iter()
                .any(|e| matches!(e, Expr::GroupingSet(_)))
            {
                return Err(unsupported("GROUPING SETS, CUBE and ROLLUP"));
            }
            (
                KeyedKind::Aggregate,
                agg.input.as_ref(),
                agg.group_expr.clone(),
            )
        }
        Some(LogicalPlan::Distinct(Distinct::All(input))) => {
            (KeyedKind::Distinct, input.as_ref(), columns(input.schema()))
        }
        Some(LogicalPlan::Window(window)) => {
            // Rows are keyed by the PARTITION BY all the window functions share.
            let mut shared: Option<Vec<Expr>> = None;
            for e in &window.window_expr {
                let partition_by = window_function(e)
                    .map(|f| f.params.partition_by.clone())
                    .unwrap_or_default();
                shared = Some(match shared {
                    None => partition_by,
                    Some(s) if s == partition_by => s,
                    Some(_) => Vec::new(),
                });
            }
            (
                KeyedKind::Window,
                window.input.as_ref(),
                shared.unwrap_or_default(),
            )
        }
        Some(LogicalPlan::Limit(limit)) => match limit.input.as_ref() {
            LogicalPlan::Sort(sort) => (KeyedKind::TopN, sort.input.as_ref(), Vec::new()),
            _ => return Err(unsupported("LIMIT without ORDER BY")),
        },
        Some(other) => {
            return Err(Error::Internal(format!(
                "no keyed form of {}",
                other.display()
            )));
        }
    };
    let mut projection: Vec<Expr> = columns(input.schema())
        .into_iter()
        .enumerate()
        .map(|(i, c)| c.alias(kept_column(i)))
        .collect();
    projection.extend(
        keys.iter()
            .enumerate()
            .map(|(i, k)| k.clone().alias(key_column(i))),
    );
    let map = LogicalPlanBuilder::from(input.clone())
        .project(projection)?
        .build()?;
    // The operator reads the kept rows in one order (by all their columns), whatever
    // order they were kept in, so that order-sensitive results (floating-point sums,
    // string_agg) come out alike every time the same rows are read.
    let kept = Arc::new(map.schema().as_arrow().clone());
    let table = datafusion::datasource::MemTable::try_new(kept, vec![vec![]])?;
    let width = input.schema().fields().len();
    let canonical: Vec<SortExpr> = (0..width)
        .map(|i| SortExpr::new(Expr::Column(Column::from_name(kept_column(i))), true, true))
        .collect();
    let restore: Vec<Expr> = input
        .schema()
        .iter()
        .enumerate()
        .map(|(i, (q, f))| {
            Expr::Column(Column::from_name(kept_column(i))).alias_qualified(q.cloned(), f.name())
        })
        .collect();
    let restored = LogicalPlanBuilder::scan(
        KEPT,
        datafusion::datasource::provider_as_source(Arc::new(table)),
        None,
    )?
    .sort(canonical)?
    .project(restore)?
    .build()?;
    let reduce = match operator {
        None => restored.clone(),
        Some(op) => replace_operator_input(logical, op, restored.clone())?,
    };
    let prune = match operator {
        Some(LogicalPlan::Limit(limit)) => Some(top_n_prune(limit, restored, map.schema())?),
        Some(LogicalPlan::Window(window)) => {
            row_number_prune(logical, window, restored, map.schema(), &keys)?
        }
        _ => None,
    };
    Ok(KeyedPlan {
        kind,
        map,
        keys,
        reduce,
        prune,
    })
}

/// The rows a top-N (`limit` over its sort) still needs of `restored` (the kept
/// rows, named as the operator's input): its first `OFFSET + LIMIT` rows in its order
/// (ties broken as the operator breaks them), as kept rows (of schema `kept`).
fn top_n_prune(limit: &Limit, restored: LogicalPlan, kept: &DFSchemaRef) -> Result<LogicalPlan> {
    let LogicalPlan::Sort(sort) = limit.input.as_ref() else {
        return Err(unsupported("LIMIT without ORDER BY"));
    };
    let (skip, fetch) = match (limit.get_skip_type()?, limit.get_fetch_type()?) {
        (SkipType::Literal(skip), FetchType::Literal(Some(fetch))) => (skip, fetch),
        _ => return Err(unsupported("a LIMIT or OFFSET that is not a number")),
    };
    let mut order = sort.expr.clone();
    order.extend(
        columns(restored.schema())
            .into_iter()
            .map(|c| SortExpr::new(c, true, true)),
    );
    let back: Vec<Expr> = columns(restored.schema())
        .into_iter()
        .zip(kept.fields())
        .map(|(c, f)| c.alias(f.name()))
        .collect();
    Ok(LogicalPlanBuilder::from(restored)
        .sort_with_limit(order, Some(skip.saturating_add(fetch)))?
        .project(back)?
        .build()?)
}

/// The rows a per-key top-N written with `ROW_NUMBER()` still needs of `restored` (the
/// kept rows, named as the operator's input): the first n rows of each key in the
/// function's order (ties broken as the operator breaks them), as kept rows (of schema
/// `kept`, the key columns last). Only when `ROW_NUMBER()` is the window's one function
/// and a filter above it keeps `<= n` (or `< n`) of it; `None` otherwise: every row is
/// kept.
fn row_number_prune(
    logical: &LogicalPlan,
    window: &Window,
    restored: LogicalPlan,
    kept: &DFSchemaRef,
    keys: &[Expr],
) -> Result<Option<LogicalPlan>> {
    let [expr] = window.window_expr.as_slice() else {
        return Ok(None);
    };
    let Some(function) = window_function(expr).filter(|f| f.fun.name() == "row_number") else {
        return Ok(None);
    };
    let Some(number) = window.schema.fields().last().map(|f| f.name().clone()) else {
        return Ok(None);
    };
    let Some(n) = row_number_bound(logical, window, &number) else {
        return Ok(None);
    };
    let mut function = function.clone();
    function.params.order_by.extend(
        columns(restored.schema())
            .into_iter()
            .map(|c| SortExpr::new(c, true, true)),
    );
    let mut back: Vec<Expr> = columns(restored.schema())
        .into_iter()
        .zip(kept.fields())
        .map(|(c, f)| c.alias(f.name()))
        .collect();
    back.extend(
        keys.iter()
            .enumerate()
            .map(|(i, k)| k.clone().alias(key_column(i))),
    );
    let rank = "__row_number";
    Ok(Some(
        LogicalPlanBuilder::from(restored)
            .window(vec![Expr::WindowFunction(Box::new(function)).alias(rank)])?
            .filter(Expr::Column(Column::from_name(rank)).lt_eq(lit(ScalarValue::UInt64(Some(n)))))?
            .project(back)?
            .build()?,
    ))
}

/// The n of a filter in `logical` that keeps the rows whose `number` (the output of
/// `window`'s `ROW_NUMBER()`) is at most n.
fn row_number_bound(logical: &LogicalPlan, window: &Window, number: &str) -> Option<u64> {
    let mut bound = None;
    let _ = logical.apply(|node| {
        if let LogicalPlan::Filter(filter) = node {
            for conjunct in split_conjunction(&filter.predicate) {
                let Expr::BinaryExpr(b) = conjunct else {
                    continue;
                };
                let (column, op, value) = match (bare_column(&b.left), bare_column(&b.right)) {
                    (Some(c), None) => (c, b.op, b.right.as_ref()),
                    (None, Some(c)) => (c, b.op.swap().unwrap_or(b.op), b.left.as_ref()),
                    _ => continue,
                };
                // An integer only: `r < 2.5` is not `r < 2`.
                let Some(value) = bare_literal(value).filter(|v| v.data_type().is_integer()) else {
                    continue;
                };
                let Some(value) = value.cast_to(&DataType::Int64).ok().and_then(|v| match v {
                    ScalarValue::Int64(Some(v)) => u64::try_from(v).ok(),
                    _ => None,
                }) else {
                    continue;
                };
                let n = match op {
                    Operator::LtEq => value,
                    Operator::Lt => value.saturating_sub(1),
                    _ => continue,
                };
                if traces_to(filter.input.as_ref(), column, window, number) {
                    bound = Some(bound.map_or(n, |b: u64| b.min(n)));
                }
            }
        }
        Ok(TreeNodeRecursion::Continue)
    });
    bound
}

/// The literal `e` is, under casts.
fn bare_literal(e: &Expr) -> Option<&ScalarValue> {
    match e {
        Expr::Literal(value, _) => Some(value),
        Expr::Cast(c) => bare_literal(&c.expr),
        Expr::TryCast(c) => bare_literal(&c.expr),
        _ => None,
    }
}

/// The column `e` is, under casts.
fn bare_column(e: &Expr) -> Option<&Column> {
    match e {
        Expr::Column(c) => Some(c),
        Expr::Cast(c) => bare_column(&c.expr),
        Expr::TryCast(c) => bare_column(&c.expr),
        _ => None,
    }
}

/// Whether `column` of `plan`'s output is `window`'s output column `number`, passed
/// up unchanged (through aliases, projections and filters).
fn traces_to(plan: &LogicalPlan, column: &Column, window: &Window, number: &str) -> bool {
    match plan {
        LogicalPlan::Window(w) if w == window => column.name == number,
        LogicalPlan::SubqueryAlias(a) => {
            traces_to(&a.input, &Column::from_name(&column.name), window, number)
        }
        LogicalPlan::Filter(f) => traces_to(&f.input, column, window, number),
        LogicalPlan::Projection(p) => {
            let Some(i) = p.schema.index_of_column(column).ok().or_else(|| {
                p.schema
                    .fields()
                    .iter()
                    .position(|f| f.name() == &column.name)
            }) else {
                return false;
            };
            let inner = match p.expr.get(i) {
                Some(Expr::Alias(a)) => a.expr.as_ref(),
                Some(e) => e,
                None => return false,
            };
            match inner {
                Expr::Column(c) => traces_to(&p.input, c, window, number),
                _ => false,
            }
        }
        _ => false,
    }
}

/// The window function of a window expression, aliased or not.
fn window_function(e: &Expr) -> Option<&WindowFunction> {
    match e {
        Expr::WindowFunction(f) => Some(f),
        Expr::Alias(a) => window_function(&a.expr),
        _ => None,
    }
}

/// `logical` with the input of its operator `op` replaced by `input` (of the same
/// schema). Orders that leave ties (a top-N's ORDER BY, ROW_NUMBER's) are completed
/// with every input column, so that which of two tied rows comes first is the same
/// every time.
fn replace_operator_input(
    logical: &LogicalPlan,
    op: &LogicalPlan,
    input: LogicalPlan,
) -> Result<LogicalPlan> {
    let ties = |schema: &DFSchemaRef| -> Vec<SortExpr> {
        columns(schema)
            .into_iter()
            .map(|c| SortExpr::new(c, true, true))
            .collect()
    };
    let mut replaced = false;
    let out = logical.clone().transform_down(|node| {
        if replaced || &node != op {
            return Ok(Transformed::no(node));
        }
        replaced = true;
        let new = match node {
            LogicalPlan::Limit(mut limit) => {
                let LogicalPlan::Sort(sort) = limit.input.as_ref() else {
                    return Err(datafusion::error::DataFusionError::Plan(
                        "LIMIT without ORDER BY".into(),
                    ));
                };
                let mut expr = sort.expr.clone();
                expr.extend(ties(input.schema()));
                limit.input = Arc::new(LogicalPlan::Sort(Sort {
                    expr,
                    input: Arc::new(input.clone()),
                    fetch: sort.fetch,
                }));
                LogicalPlan::Limit(limit)
            }
            LogicalPlan::Window(window) => {
                let exprs = window
                    .window_expr
                    .iter()
                    .map(|e| {
                        let Some(f) = window_function(e) else {
                            return Ok(e.clone());
                        };
                        if f.fun.name() != "row_number" {
                            return Ok(e.clone());
                        }
                        let mut f = f.clone();
                        f.params.order_by.extend(ties(input.schema()));
                        Ok(Expr::WindowFunction(Box::new(f)).alias(e.schema_name().to_string()))
                    })
                    .collect::<datafusion::error::Result<Vec<_>>>()?;
                LogicalPlanBuilder::from(input.clone())
                    .window(exprs)?
                    .build()?
            }
            other => other.with_new_exprs(other.expressions(), vec![input.clone()])?,
        };
        Ok(Transformed::new(new, true, TreeNodeRecursion::Jump))
    })?;
    if !replaced {
        return Err(Error::Internal(
            "the operator to key is not in its stage".into(),
        ));
    }
    Ok(out.data)
}

/// Joins may only add columns from static tables to each stream row.
fn check_joins(input: &LogicalPlan, streams: &[String]) -> Result<()> {
    let mut problem = None;
    let reads = |p: &LogicalPlan| -> Vec<String> {
        let mut found = Vec::new();
        let _ = p.apply(|n| {
            if let LogicalPlan::TableScan(s) = n {
                let name = s.table_name.table().to_string();
                if streams.contains(&name) {
                    found.push(name);
                }
            }
            Ok(TreeNodeRecursion::Continue)
        });
        found
    };
    input.apply(|node| {
        if let LogicalPlan::Join(join) = node {
            let (left, right) = (reads(&join.left), reads(&join.right));
            if !left.is_empty() && !right.is_empty() {
                problem = Some(match left.iter().find(|l| right.contains(l)) {
                    Some(same) => format!(
                        "reading source \"{same}\" twice (a self-join); join a stream with \
                         tables"
                    ),
                    None => format!(
                        "joins of two streams ({}, {}) are not supported yet; join a stream \
                         with tables",
                        crate::dataflow::view_of_stage(left.first().map_or("", |s| s.as_str())),
                        crate::dataflow::view_of_stage(right.first().map_or("", |s| s.as_str()))
                    ),
                });
                return Ok(TreeNodeRecursion::Stop);
            }
            let left = !left.is_empty();
            let ok = match join.join_type {
                JoinType::Inner => true,
                JoinType::Left | JoinType::LeftSemi | JoinType::LeftAnti => left,
                JoinType::Right | JoinType::RightSemi | JoinType::RightAnti => !left,
                _ => false,
            };
            if !ok {
                problem = Some(format!(
                    "{} JOIN that keeps unmatched table rows; join a stream with a table \
                     using INNER or LEFT JOIN with the stream on the left",
                    join.join_type
                ));
                return Ok(TreeNodeRecursion::Stop);
            }
        }
        Ok(TreeNodeRecursion::Continue)
    })?;
    match problem {
        Some(p) => Err(unsupported(p)),
        None => Ok(()),
    }
}

fn aggregate_plan(agg: &Aggregate, window: Option<&WindowSpec>) -> Result<AggregatePlan> {
    if agg
        .group_expr
        .iter()
        .any(|e| matches!(e, Expr::GroupingSet(_)))
    {
        return Err(unsupported("GROUPING SETS, CUBE and ROLLUP"));
    }
    // `GROUP BY k, k` groups by k once: the aggregate's schema has one column for it.
    let mut group_exprs: Vec<Expr> = Vec::with_capacity(agg.group_expr.len());
    for e in &agg.group_expr {
        if !group_exprs.contains(e) {
            group_exprs.push(e.clone());
        }
    }
    let n_groups = group_exprs.len();
    if agg.schema.fields().len() != n_groups + agg.aggr_expr.len() {
        return Err(unsupported(format!(
            "this GROUP BY ({}); group by distinct expressions",
            agg.group_expr
                .iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let calls = agg
        .aggr_expr
        .iter()
        .zip(agg.schema.fields().iter().skip(n_groups))
        .map(|(e, field)| aggregate_call(e, field.clone(), agg.input.schema()))
        .collect::<Result<Vec<_>>>()?;
    let key_named = |name: &str| {
        window.and(group_exprs.iter().position(|e| match e {
            Expr::Column(c) => c.name == name,
            _ => false,
        }))
    };
    Ok(AggregatePlan {
        group_exprs: group_exprs.clone(),
        calls,
        output_schema: agg.schema.clone(),
        window_start_key: key_named("window_start"),
        window_end_key: key_named("window_end"),
    })
}

fn aggregate_call(expr: &Expr, output: FieldRef, input: &DFSchemaRef) -> Result<AggregateCall> {
    let expr = match expr {
        Expr::Alias(alias) => alias.expr.as_ref(),
        e => e,
    };
    let Expr::AggregateFunction(f) = expr else {
        return Err(unsupported(format!("aggregate expression {expr}")));
    };
    let params = &f.params;
    if !params.order_by.is_empty() {
        return Err(unsupported("ORDER BY inside aggregate calls"));
    }
    let name = f.func.name().to_ascii_lowercase();
    let kind = match (name.as_str(), params.distinct) {
        ("count", false) => AggregateKind::Count,
        ("count", true) => AggregateKind::CountDistinct,
        ("sum", false) => AggregateKind::Sum,
        ("min", _) => AggregateKind::Min,
        ("max", _) => AggregateKind::Max,
        ("avg" | "mean", false) => AggregateKind::Avg,
        (_, true) => {
            return Err(unsupported(format!(
                "{name}(DISTINCT ...); only count(DISTINCT ...) is maintained incrementally"
            )));
        }
        _ => {
            return Err(unsupported(format!(
                "aggregate function {name} in a materialized view; supported are count, \
                 count(DISTINCT), sum, min, max and avg"
            )));
        }
    };
    let arg = match params.args.as_slice() {
        [] => lit(1i64),
        [arg] => arg.clone(),
        _ => return Err(unsupported(format!("{name} with several arguments"))),
    };
    // `agg(x) FILTER (WHERE c)` is `agg(CASE WHEN c THEN x END)`: every maintained
    // aggregate skips NULLs.
    let arg = match &params.filter {
        Some(filter) => when(filter.as_ref().clone(), arg).end()?,
        None => arg,
    };
    let exact = {
        use datafusion::common::ExprSchema;
        let arg_type = datafusion::logical_expr::ExprSchemable::get_type(
            &arg,
            input.as_ref() as &dyn ExprSchema,
        )?;
        arg_type.is_integer() || arg_type.is_decimal()
    };
    let invertible = match kind {
        AggregateKind::Count => true,
        AggregateKind::Sum | AggregateKind::Avg => exact,
        AggregateKind::CountDistinct | AggregateKind::Min | AggregateKind::Max => false,
    };
    Ok(AggregateCall {
        kind,
        arg,
        output,
        invertible,
    })
}

/// With HOP, the window columns of a row are its pane, so they may only be used as
/// group keys (and in the select list above the aggregation).
fn check_hop_columns(input: &LogicalPlan, agg: &AggregatePlan) -> Result<()> {
    let uses_window_column = |e: &Expr| {
        let mut found = false;
        let _ = e.apply(|x| {
            if let Expr::Column(c) = x {
                found |= c.name == "window_start" || c.name == "window_end";
            }
            Ok(TreeNodeRecursion::Continue)
        });
        found
    };
    let mut bad = agg.calls.iter().any(|c| uses_window_column(&c.arg))
        || agg
            .group_exprs
            .iter()
            .any(|e| !matches!(e, Expr::Column(_)) && uses_window_column(e));
    input.apply(|node| {
        if matches!(node, LogicalPlan::Filter(_) | LogicalPlan::Join(_)) {
            bad |= node.expressions().iter().any(uses_window_column);
        }
        Ok(TreeNodeRecursion::Continue)
    })?;
    if bad {
        return Err(unsupported(
            "with HOP, window_start and window_end can only be used in GROUP BY and the \
             select list",
        ));
    }
    Ok(())
}

/// The planner error a DataFusion callback carried out, or the DataFusion error.
pub(crate) fn unwrap_external(e: datafusion::error::DataFusionError) -> Error {
    match e {
        datafusion::error::DataFusionError::External(inner) => match inner.downcast::<Error>() {
            Ok(err) => *err,
            Err(other) => Error::DataFusion(datafusion::error::DataFusionError::External(other)),
        },
        other => Error::DataFusion(other),
    }
}
