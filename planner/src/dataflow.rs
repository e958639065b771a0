//! A view's query as a dataflow: a chain of stages, cut at every stateful operator.
//!
//! [`plan_dataflow`] compiles `CREATE MATERIALIZED VIEW` into a [`Dataflow`]. The
//! query's logical plan is cut below every operator that keeps state (an aggregate,
//! `DISTINCT`, a top-N, window functions) whose input has another such operator in
//! it: that input becomes a stage of its own, and the operator reads it as a stream of
//! changes. Each stage is a [`StreamPlan`]; the last one is the view's, named after it,
//! and the ones before are named `view#0`, `view#1`, ... A view that reads another
//! view reads that view's last stage the same way.
//!
//! At every interval the scheduler runs each stage as a map stage over the new rows
//! (or changes) of what it reads, an exchange by the stage's key, and a reduce stage
//! into the stage's state partitions; a stage runs after the stages it reads. This
//! object is what EXPLAIN prints ([`crate::stage_dag::explain`]) and what the engine
//! installs and schedules.

use std::sync::Arc;
use std::time::Duration;

use datafusion::common::Column;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::execution::SessionState;
use datafusion::logical_expr::{Expr, LogicalPlan, LogicalPlanBuilder};
use datafusion::sql::parser::Statement as DFStatement;
use datafusion::sql::sqlparser::ast;

use crate::catalog::Catalog;
use crate::error::{Result, unsupported};
use crate::statement::{CreateMaterializedView, EmitMode};
use crate::stream_plan::{
    StageContext, StreamPlan, check_window, is_stateful, plan_stage, unwrap_external,
};
use crate::window::rewrite_windows;

/// The character that separates a view's name from the number of one of its earlier
/// stages; catalog names may not contain it.
pub const STAGE_SEPARATOR: char = '#';

/// A view's stages, in the order they run: each reads a source, a view, or an
/// earlier stage; the last is the view's own.
#[derive(Clone, Debug)]
pub struct Dataflow {
    pub view: String,
    pub stages: Vec<Arc<StreamPlan>>,
}

impl Dataflow {
    /// The view's own stage: the last.
    pub fn output(&self) -> Result<&Arc<StreamPlan>> {
        self.stages
            .last()
            .ok_or_else(|| crate::Error::Internal(format!("view {} has no stages", self.view)))
    }

    /// Every catalog object the view reads, over all its stages.
    pub fn reads(&self) -> Vec<String> {
        let mut reads: Vec<String> = Vec::new();
        for stage in &self.stages {
            for r in &stage.reads {
                if !reads.contains(r) {
                    reads.push(r.clone());
                }
            }
        }
        reads
    }
}

/// The name of stage `i` (before the last) of `view`.
pub fn stage_name(view: &str, i: usize) -> String {
    format!("{view}{STAGE_SEPARATOR}{i}")
}

/// The view a stage relation belongs to.
pub fn view_of_stage(stage: &str) -> &str {
    stage.split(STAGE_SEPARATOR).next().unwrap_or(stage)
}

/// Compiles `create` against the tables registered in `state` and the `catalog`.
pub async fn plan_dataflow(
    state: &SessionState,
    catalog: &Catalog,
    create: &CreateMaterializedView,
    batch_interval: Duration,
    partitions: usize,
) -> Result<Dataflow> {
    if create.name.contains(STAGE_SEPARATOR) {
        return Err(crate::error::invalid(format!(
            "a view name cannot contain '{STAGE_SEPARATOR}': \"{}\"",
            create.name
        )));
    }
    let mut query = create.query.clone();
    let window = rewrite_windows(&mut query)?;
    match &window {
        Some(window) => check_window(window, catalog, batch_interval, create.emit)?,
        None if create.emit == EmitMode::OnWindowClose => {
            return Err(crate::error::invalid(
                "EMIT ON WINDOW CLOSE needs a windowed aggregation: \
                 GROUP BY window_start, window_end, ... over TUMBLE or HOP",
            ));
        }
        None => {}
    }
    let plan = state
        .statement_to_plan(DFStatement::Statement(Box::new(ast::Statement::Query(
            query,
        ))))
        .await?;
    let logical = state
        .analyzer()
        .execute_and_check(plan, state.config_options(), |_, _| {})?;

    // Cut the plan bottom-up: below a stateful operator (and below a union or join),
    // an input that holds a stateful operator becomes a stage of its own.
    let mut drafts: Vec<(String, LogicalPlan)> = Vec::new();
    let lowered = logical
        .transform_up(|node| {
        let cuts = is_stateful(&node)
            || matches!(node, LogicalPlan::Union(_) | LogicalPlan::Join(_));
        if !cuts {
            return Ok(Transformed::no(node));
        }
        // A top-N is LIMIT over ORDER BY: one operator, whose input the ORDER BY cut.
        let top_n = matches!(&node, LogicalPlan::Limit(l) if matches!(l.input.as_ref(), LogicalPlan::Sort(_)));
        node.map_children(|child| {
            if top_n || !child.exists(|n| Ok(is_stateful(n)))? {
                return Ok(Transformed::no(child));
            }
            let name = stage_name(&create.name, drafts.len());
            let scan = scan_of_stage(&name, &child)?;
            drafts.push((name, child));
            Ok(Transformed::yes(scan))
        })
    })
        .map_err(unwrap_external)?;
    drafts.push((create.name.clone(), lowered.data));

    let mut stages: Vec<Arc<StreamPlan>> = Vec::with_capacity(drafts.len());
    for (name, logical) in drafts {
        let cx = StageContext {
            catalog,
            view: &create.name,
            stages: &stages,
            window: window.as_ref(),
            emit: create.emit,
            partitions,
        };
        let plan = plan_stage(&cx, name, logical)?;
        stages.push(Arc::new(plan));
    }
    if let Some(w) = &window
        && !stages.iter().any(|s| s.window.is_some())
    {
        return Err(unsupported(format!(
            "the window over \"{}\" in this query; a window function reads a source",
            w.source
        )));
    }
    Ok(Dataflow {
        view: create.name.clone(),
        stages,
    })
}

/// What stands in the plan for an input cut off into stage `name`: a scan of the
/// stage's rows, named and qualified as the input's columns were.
fn scan_of_stage(name: &str, input: &LogicalPlan) -> datafusion::error::Result<LogicalPlan> {
    let schema = input.schema();
    let arrow = Arc::new(schema.as_arrow().clone());
    let mut names = std::collections::HashSet::new();
    if let Some(f) = arrow.fields().iter().find(|f| !names.insert(f.name())) {
        return Err(datafusion::error::DataFusionError::External(Box::new(
            unsupported(format!(
                "a subquery with two columns named \"{}\" read by an aggregation, DISTINCT \
                 or LIMIT; name its columns apart",
                f.name()
            )),
        )));
    }
    let table = datafusion::datasource::MemTable::try_new(arrow, vec![vec![]])?;
    let restore: Vec<Expr> = schema
        .iter()
        .map(|(q, f)| {
            Expr::Column(Column::new(Some(name), f.name())).alias_qualified(q.cloned(), f.name())
        })
        .collect();
    LogicalPlanBuilder::scan(
        name,
        datafusion::datasource::provider_as_source(Arc::new(table)),
        None,
    )?
    .project(restore)?
    .build()
}

#[cfg(test)]
mod tests {
    use datafusion::prelude::SessionContext;

    use super::*;
    use crate::catalog::CatalogObject;
    use crate::definition::source_def;
    use crate::statement::{Statement, parse_statement};
    use crate::stream_plan::KeyedKind;

    /// The stages of `view` over a source `s (k, v, ts)` with a watermark: for each,
    /// what it reads and its operator.
    async fn stages(view: &str) -> Result<Vec<(String, String)>> {
        let ctx = SessionContext::new();
        let Statement::CreateSource(create) = parse_statement(
            "CREATE SOURCE s (k BIGINT, v BIGINT, ts TIMESTAMP, \
             WATERMARK FOR ts AS ts - INTERVAL '1' SECOND) WITH (connector = 'generator')",
        )?
        else {
            panic!("not a source");
        };
        let def = source_def(&ctx.state(), &create).await?;
        ctx.register_table(
            "s",
            Arc::new(datafusion::datasource::MemTable::try_new(
                def.schema.clone(),
                vec![vec![]],
            )?),
        )?;
        let mut catalog = Catalog::default();
        catalog.insert(CatalogObject::Source(Arc::new(def)))?;
        let Statement::CreateMaterializedView(create) = parse_statement(view)? else {
            panic!("not a view: {view}");
        };
        let dataflow =
            plan_dataflow(&ctx.state(), &catalog, &create, Duration::from_secs(1), 4).await?;
        Ok(dataflow
            .stages
            .iter()
            .map(|s| {
                let operator = match (&s.aggregate, &s.keyed) {
                    (Some(_), _) => "aggregate".to_string(),
                    (None, Some(k)) if k.kind == KeyedKind::TopN => {
                        let keeps = if k.prune.is_some() { ", pruned" } else { "" };
                        format!("top-N by {} keys{keeps}", k.keys.len())
                    }
                    (None, Some(k)) => {
                        let keeps = if k.prune.is_some() { ", pruned" } else { "" };
                        format!(
                            "keyed {} by {} keys{keeps}",
                            k.kind.describe(),
                            k.keys.len()
                        )
                    }
                    (None, None) => "append".to_string(),
                };
                (s.inputs.join(","), operator)
            })
            .collect())
    }

    fn expect(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[tokio::test]
    async fn a_query_is_cut_into_a_stage_per_stateful_operator() -> Result<()> {
        // One stage, as before dataflows.
        assert_eq!(
            stages("CREATE MATERIALIZED VIEW v AS SELECT k, count(*) AS n FROM s GROUP BY k")
                .await?,
            expect(&[("s", "aggregate")])
        );
        // The same source twice with UNION ALL is one input.
        assert_eq!(
            stages("CREATE MATERIALIZED VIEW v AS SELECT k FROM s WHERE v > 1 UNION ALL SELECT v FROM s").await?,
            expect(&[("s", "append")])
        );
        // An aggregate over a running aggregate reads changes: a count is inverted
        // (deleted rows subtract), a maximum is keyed.
        assert_eq!(
            stages(
                "CREATE MATERIALIZED VIEW v AS SELECT n, count(*) AS c FROM \
                 (SELECT k, count(*) AS n FROM s GROUP BY k) AS t GROUP BY n"
            )
            .await?,
            expect(&[("s", "aggregate"), ("v#0", "aggregate")])
        );
        assert_eq!(
            stages(
                "CREATE MATERIALIZED VIEW v AS SELECT n % 2 AS odd, max(n) AS top FROM \
                 (SELECT k, count(*) AS n FROM s GROUP BY k) AS t GROUP BY n % 2"
            )
            .await?,
            expect(&[("s", "aggregate"), ("v#0", "keyed aggregate by 1 keys")])
        );
        // Over windows that close, the second stage sees inserts only: accumulators.
        assert_eq!(
            stages(
                "CREATE MATERIALIZED VIEW v AS SELECT window_start, max(n) AS top FROM \
                 (SELECT window_start, k, count(*) AS n FROM TUMBLE(s, ts, INTERVAL '1' SECOND) \
                 GROUP BY window_start, k) AS c GROUP BY window_start EMIT ON WINDOW CLOSE"
            )
            .await?,
            expect(&[("s", "aggregate"), ("v#0", "aggregate")])
        );
        // A top-N is one key; ROW_NUMBER per group is keyed by its PARTITION BY.
        assert_eq!(
            stages(
                "CREATE MATERIALIZED VIEW v AS SELECT k, n FROM \
                 (SELECT k, count(*) AS n FROM s GROUP BY k) AS c ORDER BY n DESC LIMIT 3"
            )
            .await?,
            expect(&[("s", "aggregate"), ("v#0", "top-N by 0 keys")])
        );
        assert_eq!(
            stages(
                "CREATE MATERIALIZED VIEW v AS SELECT k, v FROM (SELECT k, v, ROW_NUMBER() \
                 OVER (PARTITION BY k ORDER BY v DESC) AS r FROM s) AS x WHERE r <= 2"
            )
            .await?,
            expect(&[("s", "keyed window functions by 1 keys, pruned")])
        );
        // Only a filter on ROW_NUMBER() bounds what a key needs; another function
        // reads every row.
        assert_eq!(
            stages(
                "CREATE MATERIALIZED VIEW v AS SELECT k, v FROM (SELECT k, v, ROW_NUMBER() \
                 OVER (PARTITION BY k ORDER BY v DESC) AS r FROM s) AS x WHERE v > r"
            )
            .await?,
            expect(&[("s", "keyed window functions by 1 keys")])
        );
        assert_eq!(
            stages(
                "CREATE MATERIALIZED VIEW v AS SELECT k, v FROM (SELECT k, v, count(*) \
                 OVER (PARTITION BY k) AS c FROM s) AS x WHERE c < 3"
            )
            .await?,
            expect(&[("s", "keyed window functions by 1 keys")])
        );
        assert_eq!(
            stages("CREATE MATERIALIZED VIEW v AS SELECT DISTINCT k, v % 2 AS odd FROM s").await?,
            expect(&[("s", "keyed distinct by 2 keys")])
        );
        // Over a source, which only inserts, a top-N keeps only its first rows; over
        // counts, which change, it keeps them all.
        assert_eq!(
            stages("CREATE MATERIALIZED VIEW v AS SELECT k, v FROM s ORDER BY v DESC LIMIT 3")
                .await?,
            expect(&[("s", "top-N by 0 keys, pruned")])
        );
        // Three stages: a count, a count of counts, the top of those.
        assert_eq!(
            stages(
                "CREATE MATERIALIZED VIEW v AS SELECT n, c FROM (SELECT n, count(*) AS c FROM \
                 (SELECT k, count(*) AS n FROM s GROUP BY k) AS t GROUP BY n) AS h \
                 ORDER BY c DESC, n LIMIT 1"
            )
            .await?,
            expect(&[
                ("s", "aggregate"),
                ("v#0", "aggregate"),
                ("v#1", "top-N by 0 keys"),
            ])
        );
        Ok(())
    }
}
