//! Stream operators: what a continuous query does at every interval.
//!
//! A stage runs in two steps per interval (see `dstream_planner::stage_dag`): its
//! [`MapOperator::map_block`] turns one input block into rows for each of the P
//! state partitions, and its [`StreamOperator::process_interval`] folds one
//! partition's rows into that partition's state, producing the new state version,
//! the partition's view rows and its changelog. Both are deterministic functions of
//! their inputs. A stream operator declares the tables it keeps
//! ([`StreamOperator::state`]); the runtime does the rest.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::Arc;

use arrow::array::RecordBatch;
use async_trait::async_trait;
use datafusion::prelude::SessionContext;
use dstream_storage::IntervalId;

use crate::block::Block;
use crate::error::Result;
use crate::shuffle::Wanted;

pub mod aggregate;
pub mod append;
pub mod changelog;
pub mod keyed;
pub mod sliding;

pub use aggregate::AggregateOperator;
pub use append::AppendOperator;
pub use changelog::Changelog;
pub use keyed::KeyedOperator;

/// The map output of one block destined for one partition.
#[derive(Clone, Debug, Default)]
pub struct ShufflePiece {
    /// Partial aggregates (or, for stateless queries, output rows).
    pub rows: Vec<RecordBatch>,
    /// For each `count(DISTINCT ...)`: the distinct (keys, value) pairs seen.
    pub distinct: Vec<Vec<RecordBatch>>,
}

/// A table an operator keeps in each of its state partitions between intervals,
/// as it declares it ([`StreamOperator::state`]). The runtime stores, versions,
/// checkpoints (as `<name>.arrow`), restores and hands over every table without
/// knowing what it holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateTable {
    /// Unique within the operator; a file name (not [`VIEW_ROWS`]).
    pub name: String,
    /// What it holds, for EXPLAIN and the checkpoint docs.
    pub holds: &'static str,
}

impl StateTable {
    pub fn new(name: impl Into<String>, holds: &'static str) -> Self {
        StateTable {
            name: name.into(),
            holds,
        }
    }
}

/// The name no state table takes: checkpoints keep a partition's view rows under it.
pub const VIEW_ROWS: &str = dstream_storage::checkpoint::VIEW_ROWS;

/// The immutable state of one partition of one stage after some interval: the rows
/// of each table its operator declares, by name (an empty table may be absent).
#[derive(Clone, Debug, Default)]
pub struct StatePartition {
    pub tables: BTreeMap<String, Vec<RecordBatch>>,
    /// Sliding windows by add/subtract: the end of the last window emitted.
    pub emitted_until: Option<i64>,
    /// The watermark this version was computed with.
    pub watermark: Option<i64>,
}

impl StatePartition {
    /// The rows of table `name` (none if it is empty).
    pub fn table(&self, name: &str) -> &[RecordBatch] {
        self.tables.get(name).map_or(&[], Vec::as_slice)
    }

    /// Sets table `name` to `rows`; an empty table is left out.
    pub fn set(&mut self, name: &str, rows: Vec<RecordBatch>) {
        if rows.iter().all(|b| b.num_rows() == 0) {
            self.tables.remove(name);
        } else {
            self.tables.insert(name.to_string(), rows);
        }
    }

    /// Whether an interval with no new rows and watermark `watermark` leaves this
    /// partition unchanged: nothing was added and no window can have closed.
    pub fn unchanged_by(&self, watermark: Option<i64>) -> bool {
        watermark == self.watermark || self.tables.is_empty()
    }
}

/// What one reduce task receives.
#[derive(Clone, Debug)]
pub struct PartitionInput {
    pub interval: IntervalId,
    pub state: Arc<StatePartition>,
    pub pieces: Vec<ShufflePiece>,
    /// The partition's rows before this interval.
    pub rows: crate::view_runtime::ViewPartition,
    /// The watermark after this interval, nanoseconds since the epoch, if the query's
    /// window has one.
    pub watermark: Option<i64>,
}

/// How an interval changes a partition's view rows.
#[derive(Clone, Debug)]
pub enum ViewUpdate {
    /// The partition's view rows are now exactly these.
    Replace(Vec<RecordBatch>),
    /// These rows are added to the partition's view rows.
    Append(Vec<RecordBatch>),
}

/// What one reduce task produces.
#[derive(Clone, Debug)]
pub struct PartitionOutput {
    pub state: Arc<StatePartition>,
    pub view: ViewUpdate,
    pub changelog: Changelog,
}

impl PartitionOutput {
    /// An interval that changed nothing: the same state, no rows, no changes.
    pub fn unchanged(state: Arc<StatePartition>) -> Self {
        PartitionOutput {
            state,
            view: ViewUpdate::Append(vec![]),
            changelog: Changelog::default(),
        }
    }
}

/// The map side of a stage: what runs where an input block is, before the exchange.
#[async_trait]
pub trait MapOperator: Send + Sync + Debug {
    /// Runs the stateless part over `block` and splits the result by partition (one
    /// [`ShufflePiece`] per partition). Pieces of partitions not `wanted` are left
    /// empty, and as little work as possible goes into them.
    async fn map_block(
        &self,
        ctx: &SessionContext,
        block: &Block,
        wanted: &Wanted,
    ) -> Result<Vec<ShufflePiece>>;
}

/// The reduce side of a stage: what runs where a state partition is, after the
/// exchange. It declares the tables it keeps ([`StreamOperator::state`]); the
/// runtime keeps, checkpoints, restores and moves them.
#[async_trait]
pub trait StreamOperator: Send + Sync + Debug {
    /// The tables kept in each state partition between intervals; none by default
    /// (a stateless stage).
    fn state(&self) -> Vec<StateTable> {
        Vec::new()
    }

    /// Folds one partition's input for an interval into its state: the new state
    /// version, the partition's view rows and its changelog.
    async fn process_interval(
        &self,
        ctx: &SessionContext,
        input: PartitionInput,
    ) -> Result<PartitionOutput>;
}

/// The operators of one stage: its map side and its reduce side (one object may be
/// both).
#[derive(Clone, Debug)]
pub struct StageOperators {
    pub map: Arc<dyn MapOperator>,
    pub reduce: Arc<dyn StreamOperator>,
}

impl StageOperators {
    /// `operator` as both sides.
    pub fn of<T: MapOperator + StreamOperator + 'static>(operator: T) -> Self {
        let operator = Arc::new(operator);
        StageOperators {
            map: operator.clone(),
            reduce: operator,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use arrow::array::{Int64Array, TimestampNanosecondArray};
    use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
    use dstream_planner::catalog::CatalogObject;
    use dstream_planner::definition::source_def;
    use dstream_planner::plan_dataflow;
    use dstream_planner::statement::parse_statement;
    use dstream_planner::{Catalog, Statement};

    use super::*;
    use crate::shuffle::Wanted;
    use crate::task::{planning_context, session_config};
    use crate::view_runtime::operator_for;

    const PARTITIONS: usize = 6;

    async fn operator(view: &str) -> Result<Arc<dyn MapOperator>> {
        let ctx = SessionContext::new_with_config(session_config(PARTITIONS));
        let mut catalog = Catalog::default();
        let Statement::CreateSource(source) = parse_statement(
            "CREATE SOURCE s (k BIGINT, v BIGINT, ts TIMESTAMP) WITH (connector = 'generator')",
        )?
        else {
            panic!("not a source");
        };
        catalog.insert(CatalogObject::Source(Arc::new(
            source_def(&ctx.state(), &source).await?,
        )))?;
        let Statement::CreateMaterializedView(create) = parse_statement(view)? else {
            panic!("not a view: {view}");
        };
        let planning = planning_context(session_config(PARTITIONS), &catalog, |_| None)?;
        let dataflow = plan_dataflow(
            &planning.state(),
            &catalog,
            &create,
            Duration::from_secs(1),
            PARTITIONS,
        )
        .await?;
        Ok(operator_for(dataflow.output()?.clone())?.map)
    }

    fn block(index: usize) -> Result<Block> {
        let schema = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Int64, true),
            Field::new("v", DataType::Int64, true),
            Field::new("ts", DataType::Timestamp(TimeUnit::Nanosecond, None), true),
        ]));
        let rows = 2000i64;
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(Int64Array::from_iter_values((0..rows).map(|i| i * 7 % 211))),
                Arc::new(Int64Array::from_iter_values((0..rows).map(|i| i % 13))),
                Arc::new(TimestampNanosecondArray::from_iter_values(
                    (0..rows).map(|i| i * 3_000_000),
                )),
            ],
        )?;
        Ok(Block {
            source: "s".into(),
            interval: IntervalId(3),
            index,
            schema,
            batches: vec![batch],
            deletes: vec![],
        })
    }

    /// Rows of a piece as sorted text, to compare row sets.
    fn text(batches: &[RecordBatch]) -> Vec<String> {
        let mut rows: Vec<String> = arrow::util::pretty::pretty_format_batches(batches)
            .map(|t| t.to_string())
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with('|'))
            .skip(1)
            .map(str::to_string)
            .collect();
        rows.sort();
        rows
    }

    /// A replay's map task, asked for some partitions only, gives exactly the rows
    /// of those partitions that a full map task gives, and nothing for the others,
    /// whether it filters its input before the partial aggregate or not.
    #[tokio::test]
    async fn a_map_task_for_some_partitions_gives_their_rows_only() -> Result<()> {
        let views = [
            "CREATE MATERIALIZED VIEW a AS SELECT k, count(*) AS n, sum(v) AS t, count(DISTINCT v) AS d FROM s GROUP BY k",
            "CREATE MATERIALIZED VIEW a AS SELECT v, k % 5 AS b, max(k) AS m FROM s GROUP BY v, k % 5",
            "CREATE MATERIALIZED VIEW a AS SELECT window_start, k, count(*) AS n FROM TUMBLE(s, ts, INTERVAL '2' SECOND) GROUP BY window_start, k",
            "CREATE MATERIALIZED VIEW a AS SELECT window_start, k, sum(v) AS t FROM HOP(s, ts, INTERVAL '1' SECOND, INTERVAL '3' SECOND) GROUP BY window_start, k",
            "CREATE MATERIALIZED VIEW a AS SELECT window_start, k, max(v) AS m FROM HOP(s, ts, INTERVAL '1' SECOND, INTERVAL '3' SECOND) GROUP BY window_start, k",
            "CREATE MATERIALIZED VIEW a AS SELECT count(*) AS n FROM s",
            "CREATE MATERIALIZED VIEW a AS SELECT k, v FROM s WHERE v > 3",
        ];
        let ctx = SessionContext::new_with_config(session_config(PARTITIONS));
        let wanted = Wanted::from_list(vec![4, 1]);
        for view in views {
            let op = operator(view).await?;
            for index in 0..PARTITIONS {
                let block = block(index)?;
                let all = op.map_block(&ctx, &block, &Wanted::All).await?;
                let some = op.map_block(&ctx, &block, &wanted).await?;
                assert_eq!(all.len(), some.len(), "{view}");
                let mut compared = BTreeMap::new();
                for (p, (all, some)) in all.iter().zip(&some).enumerate() {
                    if wanted.contains(p) {
                        assert_eq!(text(&all.rows), text(&some.rows), "{view}: partition {p}");
                        for (a, s) in all.distinct.iter().zip(&some.distinct) {
                            assert_eq!(text(a), text(s), "{view}: partition {p}");
                        }
                        compared.insert(p, all.rows.iter().map(|b| b.num_rows()).sum::<usize>());
                    } else {
                        assert!(some.rows.is_empty(), "{view}: partition {p}");
                        assert!(
                            some.distinct.iter().all(Vec::is_empty),
                            "{view}: partition {p}"
                        );
                    }
                }
                assert_eq!(compared.len(), 2, "{view}");
            }
        }
        Ok(())
    }
}
