//! Window table functions: `TUMBLE(source, time_col, size)` and
//! `HOP(source, time_col, slide, size)`.
//!
//! Both are rewritten, in the SQL syntax tree, into a derived table that adds
//! `window_start` and `window_end` to every row of the source (rows whose time is
//! NULL belong to no window). For `TUMBLE` these are the row's window; for `HOP` they
//! are the row's *pane* (a tumbling window of width `slide`): the stream plan
//! aggregates rows per pane first, and only the per-pane partial aggregates are
//! assigned to the `size / slide` windows that contain the pane — or, with window
//! close and invertible aggregates, windows are assembled from panes by add/subtract.

use std::time::Duration;

use datafusion::sql::sqlparser::ast::{
    Expr, FunctionArg, FunctionArgExpr, Query, SetExpr, TableAlias, TableFactor, TableFunctionArgs,
};
use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
use datafusion::sql::sqlparser::parser::Parser;

use crate::duration::{format_duration, interval_duration};
use crate::error::{Error, Result, invalid, unsupported};
use crate::statement::normalize_ident;

/// The name of the column every source row carries: the start of its arrival interval.
pub const INTERVAL_COLUMN: &str = "_interval";

/// Which window function a query uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WindowKind {
    Tumble,
    Hop,
}

/// A window over a source's time column.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WindowSpec {
    pub kind: WindowKind,
    pub source: String,
    pub time_column: String,
    pub size: Duration,
    pub slide: Duration,
}

impl WindowSpec {
    /// Windows over `_interval` are processing-time windows; all others are event-time.
    pub fn is_processing_time(&self) -> bool {
        self.time_column == INTERVAL_COLUMN
    }

    /// Number of panes (of width `slide`) in one window.
    pub fn panes_per_window(&self) -> u64 {
        (self.size.as_nanos() / self.slide.as_nanos()) as u64
    }

    /// A human-readable description, for EXPLAIN.
    pub fn describe(&self) -> String {
        let time = if self.is_processing_time() {
            "processing time".to_string()
        } else {
            format!("event time {}", self.time_column)
        };
        match self.kind {
            WindowKind::Tumble => format!("TUMBLE size {} on {time}", format_duration(self.size)),
            WindowKind::Hop => format!(
                "HOP size {} slide {} on {time} ({} panes per window)",
                format_duration(self.size),
                format_duration(self.slide),
                self.panes_per_window()
            ),
        }
    }
}

/// Rewrites the window table functions of `query` in place and returns the window, if
/// the query uses one. A query may use at most one window function.
pub fn rewrite_windows(query: &mut Query) -> Result<Option<WindowSpec>> {
    let mut found = None;
    rewrite_query(query, &mut found)?;
    Ok(found)
}

fn rewrite_query(query: &mut Query, found: &mut Option<WindowSpec>) -> Result<()> {
    if let Some(with) = &mut query.with {
        for cte in &mut with.cte_tables {
            rewrite_query(&mut cte.query, found)?;
        }
    }
    rewrite_set_expr(&mut query.body, found)
}

fn rewrite_set_expr(body: &mut SetExpr, found: &mut Option<WindowSpec>) -> Result<()> {
    match body {
        SetExpr::Select(select) => {
            for table in &mut select.from {
                rewrite_factor(&mut table.relation, found)?;
                for join in &mut table.joins {
                    rewrite_factor(&mut join.relation, found)?;
                }
            }
            Ok(())
        }
        SetExpr::Query(q) => rewrite_query(q, found),
        SetExpr::SetOperation { left, right, .. } => {
            rewrite_set_expr(left, found)?;
            rewrite_set_expr(right, found)
        }
        _ => Ok(()),
    }
}

fn rewrite_factor(factor: &mut TableFactor, found: &mut Option<WindowSpec>) -> Result<()> {
    match factor {
        TableFactor::Derived { subquery, .. } => rewrite_query(subquery, found),
        TableFactor::NestedJoin {
            table_with_joins, ..
        } => {
            rewrite_factor(&mut table_with_joins.relation, found)?;
            for join in &mut table_with_joins.joins {
                rewrite_factor(&mut join.relation, found)?;
            }
            Ok(())
        }
        TableFactor::Table {
            name,
            args: Some(args),
            alias,
            ..
        } => {
            let function = name.to_string().to_ascii_lowercase();
            let kind = match function.as_str() {
                "tumble" => WindowKind::Tumble,
                "hop" => WindowKind::Hop,
                "session" | "cumulate" => {
                    return Err(unsupported(format!(
                        "{} windows are not supported yet; use TUMBLE or HOP",
                        function.to_ascii_uppercase()
                    )));
                }
                _ => return Ok(()),
            };
            if found.is_some() {
                return Err(unsupported("a query can use only one window function"));
            }
            let spec = window_spec(kind, args)?;
            let alias = alias.clone().unwrap_or_else(|| TableAlias {
                explicit: true,
                name: datafusion::sql::sqlparser::ast::Ident::new(&spec.source),
                columns: vec![],
                at: None,
            });
            let subquery = pane_subquery(&spec)?;
            *factor = TableFactor::Derived {
                lateral: false,
                subquery,
                alias: Some(alias),
                sample: None,
            };
            *found = Some(spec);
            Ok(())
        }
        _ => Ok(()),
    }
}

fn window_spec(kind: WindowKind, args: &TableFunctionArgs) -> Result<WindowSpec> {
    let exprs = args
        .args
        .iter()
        .map(|arg| match arg {
            FunctionArg::Unnamed(FunctionArgExpr::Expr(e)) => Ok(e),
            other => Err(invalid(format!("unexpected window argument {other}"))),
        })
        .collect::<Result<Vec<_>>>()?;
    let usage = match kind {
        WindowKind::Tumble => "TUMBLE(source, time_column, size)",
        WindowKind::Hop => "HOP(source, time_column, slide, size)",
    };
    let ident = |e: &Expr, what: &str| match e {
        Expr::Identifier(id) => Ok(normalize_ident(id)),
        other => Err(invalid(format!(
            "{usage}: expected a {what} name, found {other}"
        ))),
    };
    let (source, time_column, slide, size) = match (kind, exprs.as_slice()) {
        (WindowKind::Tumble, [source, time, size]) => {
            let size = interval_duration(size)?;
            (source, time, size, size)
        }
        (WindowKind::Hop, [source, time, slide, size]) => (
            source,
            time,
            interval_duration(slide)?,
            interval_duration(size)?,
        ),
        _ => {
            let expected = if kind == WindowKind::Tumble { 3 } else { 4 };
            return Err(invalid(format!(
                "{usage} takes {expected} arguments, {} given",
                exprs.len()
            )));
        }
    };
    let source = ident(source, "source")?;
    let time_column = ident(time_column, "column")?;
    if kind == WindowKind::Hop && size.as_nanos() % slide.as_nanos() != 0 {
        return Err(invalid(format!(
            "HOP window size {} must be a multiple of its slide {}",
            format_duration(size),
            format_duration(slide)
        )));
    }
    Ok(WindowSpec {
        kind,
        source,
        time_column,
        size,
        slide,
    })
}

/// `SELECT *, <pane start> AS window_start, <pane end> AS window_end FROM source`.
fn pane_subquery(spec: &WindowSpec) -> Result<Box<Query>> {
    let pane = sql_interval(spec.slide);
    let time = quoted(&spec.time_column);
    // date_bin's default origin is the Unix epoch.
    let start = format!("date_bin({pane}, {time})");
    // Rows without a time belong to no window.
    let sql = format!(
        "SELECT *, {start} AS window_start, {start} + {pane} AS window_end FROM {} \
         WHERE {time} IS NOT NULL",
        quoted(&spec.source)
    );
    let dialect = PostgreSqlDialect {};
    let mut parser = Parser::new(&dialect).try_with_sql(&sql)?;
    parser
        .parse_query()
        .map_err(|e| Error::Internal(format!("window rewrite produced bad SQL {sql}: {e}")))
}

fn quoted(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A duration as a SQL interval literal.
pub fn sql_interval(d: Duration) -> String {
    let nanos = d.as_nanos();
    if nanos.is_multiple_of(1_000_000) {
        format!("INTERVAL '{} milliseconds'", nanos / 1_000_000)
    } else {
        format!("INTERVAL '{nanos} nanoseconds'")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::statement::{Statement, parse_statement};

    fn query(sql: &str) -> Box<Query> {
        match parse_statement(sql) {
            Ok(Statement::Sql(stmt)) => match *stmt {
                datafusion::sql::sqlparser::ast::Statement::Query(q) => q,
                other => panic!("not a query: {other}"),
            },
            other => panic!("not a query: {other:?}"),
        }
    }

    #[test]
    fn hop_becomes_a_pane_subquery() -> Result<()> {
        let mut q = query(
            "SELECT window_start, count(*) FROM HOP(bids, date_time, INTERVAL '1' SECOND, \
             INTERVAL '5' SECOND) GROUP BY window_start",
        );
        let spec = rewrite_windows(&mut q)?.expect("a window");
        assert_eq!(spec.kind, WindowKind::Hop);
        assert_eq!(spec.panes_per_window(), 5);
        assert!(!spec.is_processing_time());
        let text = q.to_string();
        assert!(
            text.contains("date_bin(INTERVAL '1000 milliseconds'"),
            "{text}"
        );
        assert!(text.contains("AS bids"), "{text}");
        Ok(())
    }

    #[test]
    fn rejects_bad_window_arguments() {
        let mut q = query("SELECT * FROM HOP(bids, ts, INTERVAL '2' SECOND, INTERVAL '5' SECOND)");
        assert!(matches!(rewrite_windows(&mut q), Err(Error::Invalid(_))));
        let mut q = query("SELECT * FROM TUMBLE(bids, ts)");
        assert!(matches!(rewrite_windows(&mut q), Err(Error::Invalid(_))));
        let mut q = query("SELECT * FROM SESSION(bids, ts, INTERVAL '2' SECOND)");
        assert!(matches!(
            rewrite_windows(&mut q),
            Err(Error::Unsupported(_))
        ));
    }
}
