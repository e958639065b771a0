//! The per-interval tasks of each stage of a dataflow, and the EXPLAIN text.
//!
//! Every interval runs each stage of a view's [`Dataflow`] as a **map** stage with one
//! task per input piece (a block of a source, or one partition's changes of the stage
//! or view it reads), running the stateless input (and a partial aggregate), whose
//! output is hash-shuffled by key into P partitions; then a **reduce** stage with one
//! task per state partition, folding the shuffled rows into the partition's state. A
//! stage runs after the stages it reads; a **commit** then makes the interval's state,
//! view rows and changelogs visible at once.

use std::fmt::Write;
use std::time::Duration;

use crate::duration::format_duration;

use crate::dataflow::Dataflow;
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
        let input = plan
            .inputs
            .iter()
            .map(|input| {
                if plan.retracting_input {
                    format!("the interval's changes to {input} (one task per partition of it with changes)")
                } else if input.contains(crate::dataflow::STAGE_SEPARATOR) {
                    format!("the interval's new rows of {input} (one task per partition of it with rows)")
                } else {
                    format!("the interval's block of {input}")
                }
            })
            .collect::<Vec<_>>()
            .join("; ");
        if let Some(keyed) = &plan.keyed {
            let keys = keyed
                .keys
                .iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join(", ");
            let exchange = if keyed.keys.is_empty() {
                "send every row to partition 0 (one key: all rows)".to_string()
            } else {
                format!("hash-shuffle rows by key [{keys}] into {p} partitions")
            };
            stages.push(StageSpec {
                name: "map",
                fanout: Fanout::PerBlock,
                steps: vec![
                    format!("scan {input}"),
                    "run the stateless input; weigh each row +1 (insert) or -1 (delete)".into(),
                    exchange,
                ],
            });
            stages.push(StageSpec {
                name: "reduce",
                fanout: Fanout::PerPartition(p),
                steps: [
                    format!(
                        "state: the {} operator's input rows per key, with their counts",
                        keyed.kind.describe()
                    ),
                    "state(t)[p] = state(t-1)[p] + the shuffled rows (rows whose count reaches 0 leave)".into(),
                ]
                .into_iter()
                .chain(keyed.prune.as_ref().map(|_| {
                    "of the keys the interval touched, keep only the rows that can still be in the result (the kept-rows plan)".to_string()
                }))
                .chain([
                    "compute the operator for the keys the interval touched, before and after".into(),
                    "emit the difference as a changelog (deletes, then inserts)".into(),
                ])
                .collect(),
            });
            return StageDag { stages };
        }
        match &plan.aggregate {
            None => {
                stages.push(StageSpec {
                    name: "map",
                    fanout: Fanout::PerBlock,
                    steps: vec![
                        format!("scan {input}"),
                        "run the stateless query (filter, projection, joins with tables)"
                            .to_string(),
                    ],
                });
                stages.push(StageSpec {
                    name: "append",
                    fanout: Fanout::Single,
                    steps: vec!["append the rows to the stage; emit them as inserts".into()],
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
                    _ if plan.retracting_input => {
                        " of the inserted rows, minus that of the deleted rows"
                    }
                    _ => "",
                };
                stages.push(StageSpec {
                    name: "map",
                    fanout: Fanout::PerBlock,
                    steps: vec![
                        format!("scan {input}"),
                        "run the stateless input (filter, projection, joins with tables)".into(),
                        format!("partial aggregate{pane}: group by [{keys}] computing [{calls}]"),
                        format!("hash-shuffle partials by group key into {p} partitions"),
                    ],
                });
                let mut reduce = vec![
                    "state: accumulators per group".to_string(),
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

/// The text of `EXPLAIN CREATE MATERIALIZED VIEW`: the view's dataflow, stage by
/// stage, each as the map, exchange and reduce tasks every interval runs for it.
pub fn explain(dataflow: &Dataflow) -> String {
    let mut out = String::new();
    let partitions = dataflow.stages.first().map_or(0, |s| s.partitions);
    let _ = writeln!(
        out,
        "Dataflow of materialized view {} ({} {}, P = {partitions} partitions)",
        dataflow.view,
        dataflow.stages.len(),
        if dataflow.stages.len() == 1 {
            "stage"
        } else {
            "stages"
        },
    );
    for plan in &dataflow.stages {
        explain_stage(&mut out, plan);
    }
    let _ = writeln!(out, "commit (coordinator)");
    let _ = writeln!(
        out,
        "  - make every stage's state(t), the view's rows and the changelog of interval t visible atomically"
    );
    out
}

fn explain_stage(out: &mut String, plan: &StreamPlan) {
    let changes = if plan.retracting_input {
        "changes"
    } else {
        "new rows"
    };
    let _ = writeln!(
        out,
        "stage {}: reads {} ({changes})",
        plan.name,
        plan.inputs.join(", ")
    );
    if plan.inputs.len() > 1 {
        let _ = writeln!(
            out,
            "  union: the map tasks of every input feed the same exchange"
        );
    }
    if let Some(w) = &plan.window {
        let _ = writeln!(out, "  window: {}", w.describe());
        let _ = writeln!(out, "  emit: {}", plan.emit);
    }
    let operator = match (&plan.aggregate, &plan.keyed) {
        (Some(agg), _) => {
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
            format!("incremental aggregate: {calls} ({inv}); keeps state")
        }
        (None, Some(keyed)) if keyed.prune.is_some() => format!(
            "keyed {}: keeps the input rows that can still be in its result \
             (its input only inserts); keeps state",
            keyed.kind.describe()
        ),
        (None, Some(keyed)) => format!(
            "keyed {}: keeps its input rows per key; keeps state",
            keyed.kind.describe()
        ),
        (None, None) => "stateless: appends every output row".to_string(),
    };
    let _ = writeln!(out, "  operator: {operator}");
    let output = if plan.retracts {
        "changes (deletes and inserts)"
    } else {
        "inserts only"
    };
    let _ = writeln!(out, "  output: {output}");
    let _ = writeln!(out, "  input plan (per task):");
    for line in plan.input.display_indent().to_string().lines() {
        let _ = writeln!(out, "    {}", readable_intervals(line));
    }
    if let Some(keyed) = &plan.keyed {
        let _ = writeln!(out, "  operator plan (per touched key):");
        for line in keyed.reduce.display_indent().to_string().lines() {
            let _ = writeln!(out, "    {}", readable_intervals(line));
        }
        if let Some(prune) = &keyed.prune {
            let _ = writeln!(out, "  kept-rows plan (per touched key):");
            for line in prune.display_indent().to_string().lines() {
                let _ = writeln!(out, "    {}", readable_intervals(line));
            }
        }
    }
    for stage in StageDag::for_plan(plan).stages {
        let fanout = match stage.fanout {
            Fanout::PerBlock => "one task per input piece".to_string(),
            Fanout::PerPartition(p) => format!("{p} tasks, one per partition"),
            Fanout::Single => "with the reduce tasks".to_string(),
        };
        let _ = writeln!(out, "  {} ({fanout})", stage.name);
        for step in &stage.steps {
            let _ = writeln!(out, "    - {step}");
        }
    }
}
