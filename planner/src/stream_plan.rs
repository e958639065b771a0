//! From SQL to a stream plan.
//!
//! [`plan_view`] compiles the query of a `CREATE MATERIALIZED VIEW` once into a
//! [`StreamPlan`]: the DataFusion logical plan of the query, split at its aggregation
//! into
//! - the **input**: the stateless part (scan, filter, projection, join with static
//!   tables), run over each interval's new rows of the source;
//! - the **aggregate**: group keys and aggregate calls, maintained incrementally as
//!   state (partial aggregate per block, shuffle by key, merge per partition);
//! - the **output**: what lies above the aggregate (HAVING, the select list), applied to
//!   the aggregate's rows to produce the view's rows.
//!
//! The executor instantiates this plan at every interval as a stage DAG
//! ([`crate::stage_dag`]).

use std::sync::Arc;
use std::time::Duration;

use arrow::datatypes::{DataType, FieldRef, SchemaRef};
use datafusion::common::DFSchemaRef;
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::execution::SessionState;
use datafusion::logical_expr::{Aggregate, Expr, JoinType, LogicalPlan};
use datafusion::sql::parser::Statement as DFStatement;
use datafusion::sql::sqlparser::ast;

use crate::catalog::{Catalog, CatalogObject};
use crate::duration::format_duration;
use crate::error::{Error, Result, invalid, unsupported};
use crate::statement::{CreateMaterializedView, EmitMode};
use crate::window::{WindowKind, WindowSpec, rewrite_windows};

/// The compiled form of a continuous query.
#[derive(Clone, Debug)]
pub struct StreamPlan {
    /// The view this plan maintains.
    pub view: String,
    /// The one source the query reads.
    pub source: String,
    /// Every catalog object the query reads (the source and any tables).
    pub reads: Vec<String>,
    pub window: Option<WindowSpec>,
    pub emit: EmitMode,
    /// The whole query, analyzed (types coerced), not optimized.
    pub logical: LogicalPlan,
    /// The stateless part, run over one interval's rows of `source`.
    pub input: LogicalPlan,
    /// The incremental aggregation, if the query aggregates.
    pub aggregate: Option<AggregatePlan>,
    /// The schema of the view's rows.
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

/// Compiles `create` against the tables registered in `state` and the `catalog`.
pub async fn plan_view(
    state: &SessionState,
    catalog: &Catalog,
    create: &CreateMaterializedView,
    batch_interval: Duration,
    partitions: usize,
) -> Result<StreamPlan> {
    let mut query = create.query.clone();
    let window = rewrite_windows(&mut query)?;
    if let Some(window) = &window {
        check_window(window, catalog, batch_interval, create.emit)?;
    }
    let plan = state
        .statement_to_plan(DFStatement::Statement(Box::new(ast::Statement::Query(
            query,
        ))))
        .await?;
    let logical = state
        .analyzer()
        .execute_and_check(plan, state.config_options(), |_, _| {})?;

    let (source, reads) = resolve_reads(&logical, catalog)?;
    check_supported(&logical)?;
    let (input, aggregate) = split_at_aggregate(&logical)?;
    check_joins(&input, &source)?;
    let aggregate = aggregate
        .map(|agg| aggregate_plan(agg, window.as_ref()))
        .transpose()?;

    match (&aggregate, &window, create.emit) {
        (None, Some(w), _) if w.kind == WindowKind::Hop => {
            return Err(unsupported(
                "HOP windows need an aggregation: GROUP BY window_start, window_end, ...",
            ));
        }
        (None, _, EmitMode::OnWindowClose) => {
            return Err(invalid(
                "EMIT ON WINDOW CLOSE needs a windowed aggregation: \
                 GROUP BY window_start, window_end, ... over TUMBLE or HOP",
            ));
        }
        (Some(agg), w, EmitMode::OnWindowClose)
            if w.is_none() || (agg.window_start_key.is_none() && agg.window_end_key.is_none()) =>
        {
            return Err(invalid(
                "EMIT ON WINDOW CLOSE needs a windowed aggregation: \
                 GROUP BY window_start or window_end over TUMBLE or HOP",
            ));
        }
        (Some(agg), Some(w), _) if w.kind == WindowKind::Hop => {
            if agg.window_start_key.is_none() && agg.window_end_key.is_none() {
                return Err(invalid(
                    "a HOP window must be grouped by window_start or window_end",
                ));
            }
            check_hop_columns(&input, agg)?;
        }
        _ => {}
    }

    let schema = Arc::new(logical.schema().as_arrow().clone());
    Ok(StreamPlan {
        view: create.name.clone(),
        source,
        reads,
        window,
        emit: create.emit,
        input,
        aggregate,
        schema,
        logical,
        partitions,
    })
}

/// Finds the source and the tables the plan reads.
fn resolve_reads(plan: &LogicalPlan, catalog: &Catalog) -> Result<(String, Vec<String>)> {
    let mut reads = Vec::new();
    let mut scans: Vec<String> = Vec::new();
    plan.apply(|node| {
        if let LogicalPlan::TableScan(scan) = node {
            let name = scan.table_name.table().to_string();
            scans.push(name.clone());
            if !reads.contains(&name) {
                reads.push(name);
            }
        }
        Ok(TreeNodeRecursion::Continue)
    })?;
    let mut sources = Vec::new();
    for name in &reads {
        match catalog.get(name) {
            Some(CatalogObject::Source(_)) => sources.push(name.clone()),
            Some(CatalogObject::Table(_)) => {}
            Some(CatalogObject::View(_)) => {
                return Err(unsupported(format!(
                    "a materialized view cannot read materialized view \"{name}\" yet; \
                     read its source instead"
                )));
            }
            None => {
                return Err(unsupported(format!(
                    "a materialized view cannot read \"{name}\"; it reads sources and tables"
                )));
            }
        }
    }
    if let Some(source) = sources.first()
        && scans.iter().filter(|s| *s == source).count() > 1
    {
        return Err(unsupported(format!(
            "reading source \"{source}\" twice (a self-join); join a stream with tables"
        )));
    }
    match sources.len() {
        1 => Ok((sources.remove(0), reads)),
        0 => Err(invalid(
            "a materialized view must read a source; to query tables alone, use SELECT",
        )),
        _ => Err(unsupported(format!(
            "joins of two streams ({}) are not supported yet; join a stream with tables",
            sources.join(", ")
        ))),
    }
}

fn check_window(
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

/// Rejects constructs that have no incremental form (yet), naming them.
fn check_supported(plan: &LogicalPlan) -> Result<()> {
    let mut aggregates = 0;
    plan.apply_with_subqueries(|node| {
        let problem = match node {
            LogicalPlan::Aggregate(_) => {
                aggregates += 1;
                (aggregates > 1).then_some("nested aggregations")
            }
            LogicalPlan::Sort(_) => {
                Some("ORDER BY in a materialized view (order when you query the view)")
            }
            LogicalPlan::Limit(_) => {
                Some("LIMIT in a materialized view (limit when you query the view)")
            }
            LogicalPlan::Window(_) => Some("window functions with OVER (...)"),
            LogicalPlan::Distinct(_) => Some("SELECT DISTINCT (use GROUP BY)"),
            LogicalPlan::Union(_) => Some("UNION"),
            LogicalPlan::Subquery(_) => Some("subqueries in expressions"),
            LogicalPlan::RecursiveQuery(_) => Some("recursive queries"),
            _ => None,
        };
        match problem {
            Some(p) => Err(datafusion::error::DataFusionError::External(Box::new(
                unsupported(format!("{p} in materialized views is not supported")),
            ))),
            None => Ok(TreeNodeRecursion::Continue),
        }
    })
    .map_err(unwrap_external)?;
    Ok(())
}

fn unwrap_external(e: datafusion::error::DataFusionError) -> Error {
    match e {
        datafusion::error::DataFusionError::External(inner) => match inner.downcast::<Error>() {
            Ok(err) => *err,
            Err(other) => Error::DataFusion(datafusion::error::DataFusionError::External(other)),
        },
        other => Error::DataFusion(other),
    }
}

/// Splits the plan into its stateless input and the aggregate above it. Only
/// projections, filters and aliases may stand above the aggregate.
fn split_at_aggregate(plan: &LogicalPlan) -> Result<(LogicalPlan, Option<&Aggregate>)> {
    let mut node = plan;
    loop {
        match node {
            LogicalPlan::Aggregate(agg) => return Ok((agg.input.as_ref().clone(), Some(agg))),
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
    let mut has_aggregate = false;
    node.apply(|n| {
        has_aggregate |= matches!(n, LogicalPlan::Aggregate(_));
        Ok(TreeNodeRecursion::Continue)
    })?;
    if has_aggregate {
        return Err(unsupported(
            "an aggregation below a join or subquery in a materialized view",
        ));
    }
    Ok((plan.clone(), None))
}

/// Joins may only add columns from static tables to each stream row.
fn check_joins(input: &LogicalPlan, source: &str) -> Result<()> {
    let mut problem = None;
    input.apply(|node| {
        if let LogicalPlan::Join(join) = node {
            let reads_source = |p: &LogicalPlan| {
                let mut found = false;
                let _ = p.apply(|n| {
                    if let LogicalPlan::TableScan(s) = n {
                        found |= s.table_name.table() == source;
                    }
                    Ok(TreeNodeRecursion::Continue)
                });
                found
            };
            let left = reads_source(&join.left);
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
    if params.filter.is_some() {
        return Err(unsupported("FILTER (WHERE ...) on aggregates"));
    }
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
        [] => datafusion::logical_expr::lit(1i64),
        [arg] => arg.clone(),
        _ => return Err(unsupported(format!("{name} with several arguments"))),
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
