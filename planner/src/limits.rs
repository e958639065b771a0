//! Limits on what one statement may ask of the server.
//!
//! A statement that is too big or too deeply nested for the server to parse, plan
//! and run safely is refused with [`Error::TooComplex`] (SQLSTATE `54001`), and a
//! view whose windows would multiply every row, or close more windows in one
//! interval than the server can emit, with [`Error::LimitExceeded`] (`54000`),
//! instead of exhausting a thread's stack or the interval loop's time. The entry type
//! is [`StatementLimits`]; [`parse_statements_within`] reads a script under them.
//!
//! The checks walk the syntax tree only as deep as the limit, and the parser's own
//! recursion guard stops parenthesized nesting, so a check never recurses further
//! than the depth it allows. The front doors parse, plan and run statements on
//! threads whose stacks are sized for [`StatementLimits::max_expression_depth`]
//! (see [`STATEMENT_STACK_BYTES`]).

use std::ops::ControlFlow;
use std::time::Duration;

use datafusion::sql::sqlparser::ast::{Expr, Query, SetExpr, Visit, Visitor};

use crate::duration::format_duration;
use crate::error::{Error, Result};
use crate::statement::{Statement, parse_statements};
use crate::window::WindowSpec;

/// The stack of a thread that parses, plans or runs a statement: enough for an
/// expression [`DEFAULT_MAX_EXPRESSION_DEPTH`] levels deep through DataFusion's
/// planner, optimizer and evaluation, in a debug build, with room to spare. Only the
/// pages a statement touches are ever allocated.
pub const STATEMENT_STACK_BYTES: usize = 256 * 1024 * 1024;

/// The highest [`StatementLimits::max_expression_depth`] allowed: a 2,990-term sum
/// runs on these stacks (in about 50 s in a debug build; planning grows faster than
/// the depth).
pub const MAX_EXPRESSION_DEPTH: usize = 3_000;

/// Default of [`StatementLimits::max_statement_bytes`]: 1 MiB.
pub const DEFAULT_MAX_STATEMENT_BYTES: usize = 1024 * 1024;
/// Default of [`StatementLimits::max_expression_depth`].
pub const DEFAULT_MAX_EXPRESSION_DEPTH: usize = 1000;
/// Default of [`StatementLimits::max_expression_nodes`].
pub const DEFAULT_MAX_EXPRESSION_NODES: usize = 100_000;
/// Default of [`StatementLimits::max_windows_per_row`].
pub const DEFAULT_MAX_WINDOWS_PER_ROW: u64 = 1000;
/// Default of [`StatementLimits::max_windows_per_interval`].
pub const DEFAULT_MAX_WINDOWS_PER_INTERVAL: u64 = 1000;

/// What one statement may ask of the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatementLimits {
    /// Longest statement text (a whole script sent at once), in bytes.
    pub max_statement_bytes: usize,
    /// Deepest nesting of expressions and set operations (`a + b + c` nests two deep;
    /// so does `SELECT 1 UNION ALL SELECT 2 UNION ALL SELECT 3`).
    pub max_expression_depth: usize,
    /// Most expression nodes in one statement.
    pub max_expression_nodes: usize,
    /// Most windows one row belongs to: a `HOP` window's size ÷ slide.
    pub max_windows_per_row: u64,
    /// Most windows that end within one interval: the batch interval ÷ the window's
    /// slide (a `TUMBLE`'s slide is its size).
    pub max_windows_per_interval: u64,
}

impl Default for StatementLimits {
    fn default() -> Self {
        StatementLimits {
            max_statement_bytes: DEFAULT_MAX_STATEMENT_BYTES,
            max_expression_depth: DEFAULT_MAX_EXPRESSION_DEPTH,
            max_expression_nodes: DEFAULT_MAX_EXPRESSION_NODES,
            max_windows_per_row: DEFAULT_MAX_WINDOWS_PER_ROW,
            max_windows_per_interval: DEFAULT_MAX_WINDOWS_PER_INTERVAL,
        }
    }
}

impl StatementLimits {
    /// Refuses a script longer than [`Self::max_statement_bytes`].
    pub fn check_text(&self, sql: &str) -> Result<()> {
        if sql.len() > self.max_statement_bytes {
            return Err(Error::TooComplex(format!(
                "statement is {} bytes long; the limit is {} (max_statement_bytes)",
                sql.len(),
                self.max_statement_bytes
            )));
        }
        Ok(())
    }

    /// Refuses a statement nested deeper than [`Self::max_expression_depth`] or with
    /// more than [`Self::max_expression_nodes`] expressions.
    pub fn check_statement(&self, statement: &Statement) -> Result<()> {
        let mut walk = Complexity {
            limits: self,
            depth: 0,
            nodes: 0,
        };
        let flow = match statement {
            Statement::Sql(stmt) => stmt.visit(&mut walk),
            Statement::CreateMaterializedView(create) | Statement::ExplainView(create) => {
                create.query.visit(&mut walk)
            }
            Statement::CreateSource(create) => match &create.watermark {
                Some(watermark) => watermark.expr.visit(&mut walk),
                None => ControlFlow::Continue(()),
            },
            Statement::Show(_)
            | Statement::Describe(_)
            | Statement::Drop(_)
            | Statement::SetBatchInterval(_)
            | Statement::Advance(_)
            | Statement::Subscribe(_) => ControlFlow::Continue(()),
        };
        match flow {
            ControlFlow::Break(e) => Err(e),
            ControlFlow::Continue(()) => Ok(()),
        }
    }

    /// Refuses a window that puts a row in more than [`Self::max_windows_per_row`]
    /// windows, or ends more than [`Self::max_windows_per_interval`] windows in one
    /// interval of `batch_interval`.
    pub fn check_window(&self, window: &WindowSpec, batch_interval: Duration) -> Result<()> {
        let per_row = window.panes_per_window();
        if per_row > self.max_windows_per_row {
            return Err(Error::LimitExceeded(format!(
                "a HOP window of size {} sliding by {} puts every row in {per_row} windows; \
                 the limit is {} (max_windows_per_row): use a longer slide or a shorter size",
                format_duration(window.size),
                format_duration(window.slide),
                self.max_windows_per_row
            )));
        }
        let per_interval = batch_interval.as_nanos() / window.slide.as_nanos().max(1);
        if per_interval > u128::from(self.max_windows_per_interval) {
            return Err(Error::LimitExceeded(format!(
                "windows sliding by {} end {per_interval} times in every interval of {}; \
                 the limit is {} (max_windows_per_interval): use a longer slide",
                format_duration(window.slide),
                format_duration(batch_interval),
                self.max_windows_per_interval
            )));
        }
        Ok(())
    }
}

/// Parses a script of `;`-separated statements, refusing one over `limits`.
pub fn parse_statements_within(sql: &str, limits: &StatementLimits) -> Result<Vec<Statement>> {
    limits.check_text(sql)?;
    let statements = parse_statements(sql)?;
    for statement in &statements {
        limits.check_statement(statement)?;
    }
    Ok(statements)
}

/// Counts the nesting and the number of expressions, stopping at the first limit.
struct Complexity<'a> {
    limits: &'a StatementLimits,
    depth: usize,
    nodes: usize,
}

impl Complexity<'_> {
    fn too_deep(&self) -> Error {
        Error::TooComplex(format!(
            "statement is nested more than {} levels deep (max_expression_depth)",
            self.limits.max_expression_depth
        ))
    }
}

impl Visitor for Complexity<'_> {
    type Break = Error;

    fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<Error> {
        // A chain of UNIONs is a left-deep tree of set operations, not of expressions.
        let room = self.limits.max_expression_depth.saturating_sub(self.depth);
        if set_depth(&query.body, room) > room {
            return ControlFlow::Break(self.too_deep());
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, _expr: &Expr) -> ControlFlow<Error> {
        self.depth += 1;
        self.nodes += 1;
        if self.depth > self.limits.max_expression_depth {
            return ControlFlow::Break(self.too_deep());
        }
        if self.nodes > self.limits.max_expression_nodes {
            return ControlFlow::Break(Error::TooComplex(format!(
                "statement has more than {} expressions (max_expression_nodes)",
                self.limits.max_expression_nodes
            )));
        }
        ControlFlow::Continue(())
    }

    fn post_visit_expr(&mut self, _expr: &Expr) -> ControlFlow<Error> {
        self.depth = self.depth.saturating_sub(1);
        ControlFlow::Continue(())
    }
}

/// How deeply set operations nest in `body`, counted no further than `limit + 1`.
fn set_depth(body: &SetExpr, limit: usize) -> usize {
    match body {
        SetExpr::SetOperation { left, right, .. } if limit > 0 => {
            let below = set_depth(left, limit - 1).max(set_depth(right, limit - 1));
            below + 1
        }
        SetExpr::SetOperation { .. } => 1,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum_of_ones(terms: usize) -> String {
        format!("SELECT {}", vec!["1"; terms].join(" + "))
    }

    fn limits() -> StatementLimits {
        StatementLimits {
            max_expression_depth: 50,
            max_expression_nodes: 200,
            max_statement_bytes: 4096,
            ..StatementLimits::default()
        }
    }

    #[test]
    fn a_statement_within_the_limits_parses() -> Result<()> {
        let statements = parse_statements_within(&sum_of_ones(40), &limits())?;
        assert_eq!(statements.len(), 1);
        Ok(())
    }

    #[test]
    fn deep_long_and_wide_statements_are_too_complex() {
        let limits = limits();
        for sql in [
            sum_of_ones(60),
            format!("SELECT {}", vec!["a = 1"; 60].join(" OR ")),
            format!("SELECT {}", vec!["'x'"; 60].join(" || ")),
            vec!["SELECT 1"; 60].join(" UNION ALL "),
            format!("SELECT {}", vec!["(1 + 2)"; 150].join(", ")),
            format!("SELECT '{}'", "x".repeat(5000)),
            format!("SELECT {}1{}", "(".repeat(200), ")".repeat(200)),
        ] {
            let result = parse_statements_within(&sql, &limits);
            assert!(
                matches!(result, Err(Error::TooComplex(_))),
                "{}...: {result:?}",
                &sql[..40]
            );
        }
    }

    #[test]
    fn a_view_and_a_watermark_are_checked_too() {
        let view = format!(
            "CREATE MATERIALIZED VIEW v AS SELECT {} AS n FROM s",
            vec!["1"; 60].join(" + ")
        );
        let source = format!(
            "CREATE SOURCE s (ts TIMESTAMP, WATERMARK FOR ts AS ts - {}) \
             WITH (connector = 'generator')",
            vec!["INTERVAL '1' SECOND"; 60].join(" - ")
        );
        for sql in [view, source] {
            assert!(matches!(
                parse_statements_within(&sql, &limits()),
                Err(Error::TooComplex(_))
            ));
        }
    }

    #[test]
    fn windows_per_row_and_per_interval_are_limited() {
        let limits = StatementLimits::default();
        let window = |slide: u64, size: u64| WindowSpec {
            kind: crate::WindowKind::Hop,
            source: "s".into(),
            time_column: "ts".into(),
            slide: Duration::from_millis(slide),
            size: Duration::from_millis(size),
        };
        let second = Duration::from_secs(1);
        assert!(limits.check_window(&window(1000, 60_000), second).is_ok());
        assert!(matches!(
            limits.check_window(&window(1000, 100_000_000), second),
            Err(Error::LimitExceeded(_))
        ));
        assert!(matches!(
            limits.check_window(&window(1, 1), Duration::from_secs(10)),
            Err(Error::LimitExceeded(_))
        ));
    }
}
