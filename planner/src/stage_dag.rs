//! The per-interval stage DAG of a stream plan, and its EXPLAIN text.
//!
//! Every interval instantiates the same small DAG: a **map** stage with one task per
//! input block, running the stateless input and the partial aggregate, whose output is
//! hash-shuffled by group key into P partitions; then a **reduce** stage with one task
//! per state partition, merging the shuffled partials into the partition's state; then
//! a **commit** that makes the interval's state, view rows and changelog visible at once.

use std::fmt::Write;
use std::time::Duration;

use crate::duration::format_duration;

use crate::statement::EmitMode;
use crate::stream_plan::{AggregateKind, StreamPlan};
use crate::window::WindowKind;

/// How many tasks a stage runs per interval.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fanout {
    /// One task per input block of the interval.
    PerBlock,
    /// One task per state partition.
    PerPartition(usize),
    /// A single step on the coordinator.
    Single,
}

/// One stage of the per-interval DAG.
#[derive(Clone, Debug)]
pub struct StageSpec {
    pub name: &'static str,
    pub fanout: Fanout,
    pub steps: Vec<String>,
}

/// The stages every interval runs for one stream plan, in dependency order.
#[derive(Clone, Debug)]
pub struct StageDag {
    pub stages: Vec<StageSpec>,
}

impl StageDag {
    pub fn for_plan(plan: &StreamPlan) -> StageDag {
        let p = plan.partitions;
        let mut stages = Vec::new();
        match &plan.aggregate {
            None => {
                stages.push(StageSpec {
                    name: "map",
                    fanout: Fanout::PerBlock,
                    steps: vec![
                        format!("scan the interval's block of {}", plan.source),
                        "run the stateless query (filter, projection, joins with tables)"
                            .to_string(),
                    ],
                });
                stages.push(StageSpec {
                    name: "commit",
                    fanout: Fanout::Single,
                    steps: vec!["append the rows to the view; emit them as inserts".into()],
                });
            }
            Some(agg) => {
                let keys = agg
                    .group_exprs
                    .iter()
                    .map(|e| e.to_string())
                    .collect::<Vec<_>>()
                    .join(", ");
                let calls = agg
                    .calls
                    .iter()
                    .map(|c| format!("{}({})", c.kind.name(), c.arg))
                    .collect::<Vec<_>>()
                    .join(", ");
                let pane = match &plan.window {
                    Some(w) if w.kind == WindowKind::Hop => " per pane",
                    _ => "",
                };
                stages.push(StageSpec {
                    name: "map",
                    fanout: Fanout::PerBlock,
                    steps: vec![
                        format!("scan the interval's block of {}", plan.source),
                        "run the stateless input (filter, projection, joins with tables)".into(),
                        format!("partial aggregate{pane}: group by [{keys}] computing [{calls}]"),
                        format!("hash-shuffle partials by group key into {p} partitions"),
                    ],
                });
                let mut reduce = vec![
                    "merge shuffled partials into state(t-1)[p], giving state(t)[p]".to_string(),
                ];
                if agg
                    .calls
                    .iter()
                    .any(|c| c.kind == AggregateKind::CountDistinct)
                {
                    reduce.push("count(DISTINCT): keep the distinct values seen per group; count only new ones".into());
                }
                match (&plan.window, plan.emit) {
                    (Some(w), EmitMode::OnWindowClose)
                        if w.kind == WindowKind::Hop && agg.invertible() =>
                    {
                        reduce.push(
                            "state holds panes; when the watermark closes a window: \
                             window = previous window + newest pane - expired pane"
                                .into(),
                        );
                        reduce.push("emit closed windows as inserts; drop expired panes".into());
                    }
                    (Some(w), EmitMode::OnWindowClose) => {
                        if w.kind == WindowKind::Hop {
                            reduce.push(
                                "add each pane's partials to the windows that contain it".into(),
                            );
                        }
                        reduce.push(
                            "emit windows the watermark closed as inserts; drop them from state"
                                .into(),
                        );
                    }
                    (Some(w), EmitMode::OnUpdate) if w.kind == WindowKind::Hop => {
                        reduce
                            .push("add each pane's partials to the windows that contain it".into());
                        reduce.push(
                            "emit changed windows as a changelog (deletes, then inserts)".into(),
                        );
                    }
                    _ => reduce
                        .push("emit changed groups as a changelog (deletes, then inserts)".into()),
                }
                stages.push(StageSpec {
                    name: "reduce",
                    fanout: Fanout::PerPartition(p),
                    steps: reduce,
                });
                stages.push(StageSpec {
                    name: "commit",
                    fanout: Fanout::Single,
                    steps: vec![
                        "make state(t), the view's rows and the changelog of interval t visible atomically".into(),
                    ],
                });
            }
        }
        StageDag { stages }
    }
}

/// Shows DataFusion's interval literals, `IntervalMonthDayNano("IntervalMonthDayNano {
/// months: 0, days: 0, nanoseconds: N }")`, as durations such as `INTERVAL '1s'`.
fn readable_intervals(line: &str) -> String {
    const OPEN: &str =
        "IntervalMonthDayNano(\"IntervalMonthDayNano { months: 0, days: 0, nanoseconds: ";
    const CLOSE: &str = " }\")";
    let mut out = String::with_capacity(line.len());
    let mut rest = line;
    while let Some(at) = rest.find(OPEN) {
        let after = &rest[at + OPEN.len()..];
        let Some(end) = after.find(CLOSE) else { break };
        let Ok(nanos) = after[..end].parse::<u64>() else {
            break;
        };
        out.push_str(&rest[..at]);
        let _ = write!(
            out,
            "INTERVAL '{}'",
            format_duration(Duration::from_nanos(nanos))
        );
        rest = &after[end + CLOSE.len()..];
    }
    out.push_str(rest);
    out
}

/// The text of `EXPLAIN CREATE MATERIALIZED VIEW`.
pub fn explain(plan: &StreamPlan) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "Stream plan for materialized view {}", plan.view);
    let _ = writeln!(out, "  source: {}", plan.source);
    if let Some(w) = &plan.window {
        let _ = writeln!(out, "  window: {}", w.describe());
    }
    let _ = writeln!(out, "  emit: {}", plan.emit);
    match &plan.aggregate {
        Some(agg) => {
            let calls = agg
                .calls
                .iter()
                .map(|c| c.kind.name())
                .collect::<Vec<_>>()
                .join(", ");
            let inv = if agg.invertible() {
                "invertible"
            } else {
                "not invertible"
            };
            let _ = writeln!(out, "  aggregates: {calls} ({inv})");
        }
        None => {
            let _ = writeln!(out, "  stateless: the view appends every output row");
        }
    }
    let _ = writeln!(out, "  input plan (per block):");
    for line in plan.input.display_indent().to_string().lines() {
        let _ = writeln!(out, "    {}", readable_intervals(line));
    }
    let _ = writeln!(
        out,
        "Per-interval stage DAG (P = {} partitions):",
        plan.partitions
    );
    for (i, stage) in StageDag::for_plan(plan).stages.iter().enumerate() {
        let fanout = match stage.fanout {
            Fanout::PerBlock => "one task per input block".to_string(),
            Fanout::PerPartition(p) => format!("{p} tasks, one per partition"),
            Fanout::Single => "coordinator".to_string(),
        };
        let _ = writeln!(out, "  stage {} {} ({fanout})", i + 1, stage.name);
        for step in &stage.steps {
            let _ = writeln!(out, "    - {step}");
        }
    }
    out
}
