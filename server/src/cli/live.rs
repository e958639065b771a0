//! Results that change: `\watch` (a query run again every interval, its table
//! redrawn) and the live table of a `SUBSCRIBE` (the view's rows, kept up to date from
//! its changelog and redrawn every interval).

use std::collections::BTreeMap;
use std::time::Duration;

use tokio_postgres::types::Type;

use super::output::{ResultRows, aligned};

/// ANSI: cursor home, then clear the screen.
pub const CLEAR_SCREEN: &str = "\x1b[H\x1b[2J";

/// The arguments of `\watch`: `[SECONDS]`, `i=SECONDS`, `c=COUNT`, as psql takes them.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct WatchArgs {
    /// `None`: every interval of the server.
    pub every: Option<Duration>,
    /// `None`: until Ctrl-C.
    pub count: Option<u64>,
}

impl WatchArgs {
    pub fn parse(args: &[&str]) -> Result<Self, String> {
        let mut parsed = WatchArgs::default();
        for arg in args {
            let (key, value) = match arg.split_once('=') {
                Some((key, value)) => (key, value),
                None => ("i", *arg),
            };
            match key {
                "i" | "interval" => {
                    let every = value
                        .parse::<f64>()
                        .ok()
                        .filter(|s| *s > 0.0)
                        .and_then(|s| Duration::try_from_secs_f64(s).ok())
                        .ok_or_else(|| format!("\\watch: invalid interval \"{value}\""))?;
                    parsed.every = Some(every);
                }
                "c" | "count" => {
                    let count: u64 = value
                        .parse()
                        .ok()
                        .filter(|c| *c > 0)
                        .ok_or_else(|| format!("\\watch: invalid count \"{value}\""))?;
                    parsed.count = Some(count);
                }
                other => return Err(format!("\\watch: unknown option \"{other}\"")),
            }
        }
        Ok(parsed)
    }
}

/// One line of COPY text: its fields, `None` for `\N`.
pub fn copy_fields(line: &str) -> Vec<Option<String>> {
    line.split('\t')
        .map(|field| {
            if field == "\\N" {
                return None;
            }
            let mut out = String::with_capacity(field.len());
            let mut chars = field.chars();
            while let Some(c) = chars.next() {
                if c != '\\' {
                    out.push(c);
                    continue;
                }
                match chars.next() {
                    Some('t') => out.push('\t'),
                    Some('n') => out.push('\n'),
                    Some('r') => out.push('\r'),
                    Some(other) => out.push(other),
                    None => out.push('\\'),
                }
            }
            Some(out)
        })
        .collect()
}

/// A subscribed view's rows, kept up to date from its changelog: each line is
/// `_interval`, `op` (`insert` or `delete`), then the view's columns.
#[derive(Debug, Default)]
pub struct LiveTable {
    columns: Vec<String>,
    rows: BTreeMap<Vec<Option<String>>, usize>,
    /// The interval of the last change, as the server printed it.
    pub interval: Option<String>,
    pub changes: u64,
}

impl LiveTable {
    pub fn new(columns: Vec<String>) -> Self {
        LiveTable {
            columns,
            ..LiveTable::default()
        }
    }

    /// Applies one chunk of COPY text (the changes of one interval, or the snapshot).
    pub fn apply(&mut self, chunk: &str) {
        for line in chunk.lines().filter(|l| !l.is_empty()) {
            let mut fields = copy_fields(line).into_iter();
            let interval = fields.next().flatten();
            let op = fields.next().flatten();
            let row: Vec<Option<String>> = fields.collect();
            self.interval = interval.or(self.interval.take());
            self.changes = self.changes.saturating_add(1);
            match op.as_deref() {
                Some("delete") => {
                    if let Some(count) = self.rows.get_mut(&row) {
                        *count = count.saturating_sub(1);
                        if *count == 0 {
                            self.rows.remove(&row);
                        }
                    }
                }
                _ => {
                    let count = self.rows.entry(row).or_default();
                    *count = count.saturating_add(1);
                }
            }
        }
    }

    /// The rows now, as a table.
    pub fn render(&self) -> String {
        let rows = ResultRows {
            columns: self
                .columns
                .iter()
                .map(|c| (c.clone(), Type::TEXT))
                .collect(),
            rows: self
                .rows
                .iter()
                .flat_map(|(row, count)| std::iter::repeat_n(row.clone(), *count))
                .collect(),
        };
        aligned(&rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watch_takes_psql_arguments() {
        assert_eq!(WatchArgs::parse(&[]), Ok(WatchArgs::default()));
        assert_eq!(
            WatchArgs::parse(&["0.5", "c=3"]),
            Ok(WatchArgs {
                every: Some(Duration::from_millis(500)),
                count: Some(3)
            })
        );
        assert!(WatchArgs::parse(&["i=0"]).is_err());
        assert!(WatchArgs::parse(&["1e20"]).is_err());
        assert!(WatchArgs::parse(&["x=1"]).is_err());
    }

    #[test]
    fn a_live_table_follows_the_changelog() {
        let mut table = LiveTable::new(vec!["k".into(), "n".into()]);
        table.apply("2026-01-01 00:00:00\tinsert\ta\t1\n2026-01-01 00:00:00\tinsert\tb\\tc\t\\N\n");
        table.apply("2026-01-01 00:00:01\tdelete\ta\t1\n2026-01-01 00:00:01\tinsert\ta\t2\n");
        assert_eq!(table.interval.as_deref(), Some("2026-01-01 00:00:01"));
        let text = table.render();
        assert!(text.contains("| a   | 2    |"), "{text}");
        assert!(text.contains("| b\tc | NULL |"), "{text}");
        assert!(!text.contains("| 1 "), "{text}");
        assert!(text.contains("(2 rows)"), "{text}");
    }
}
