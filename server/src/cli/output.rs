//! Printing results: [`Format`] (aligned tables, CSV or JSON) over the rows of
//! the simple query protocol, as [`ResultRows`].

use comfy_table::{Table, presets};
use tokio_postgres::SimpleQueryMessage;
use tokio_postgres::types::Type;

use super::input::command_tag;

/// How results are printed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Tables with borders and a row count, as psql prints them.
    #[default]
    Aligned,
    /// A header line, then one line per row (RFC 4180 quoting; NULL is empty).
    Csv,
    /// One JSON array of objects per result; numbers and booleans typed, NULL null.
    Json,
}

impl Format {
    pub fn parse(name: &str) -> Option<Format> {
        match name.to_ascii_lowercase().as_str() {
            "aligned" => Some(Format::Aligned),
            "csv" => Some(Format::Csv),
            "json" => Some(Format::Json),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Format::Aligned => "aligned",
            Format::Csv => "csv",
            Format::Json => "json",
        }
    }
}

/// The rows of one result, as text.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ResultRows {
    pub columns: Vec<(String, Type)>,
    pub rows: Vec<Vec<Option<String>>>,
}

/// What one statement printed: rows, or a command tag.
#[derive(Clone, Debug, PartialEq)]
pub enum Printed {
    Rows(ResultRows),
    Tag(String),
}

/// The results of `sql` in the messages the server sent. The simple query protocol
/// names columns without their types: `types` gives them where they are known (the
/// statement prepared), and they are text otherwise.
pub fn results(sql: &str, messages: Vec<SimpleQueryMessage>, types: &[Type]) -> Vec<Printed> {
    let mut out = Vec::new();
    let mut current: Option<ResultRows> = None;
    for message in messages {
        match message {
            SimpleQueryMessage::RowDescription(columns) => {
                current = Some(ResultRows {
                    columns: columns
                        .iter()
                        .enumerate()
                        .map(|(i, c)| {
                            let t = types.get(i).cloned().unwrap_or(Type::TEXT);
                            (c.name().to_string(), t)
                        })
                        .collect(),
                    rows: Vec::new(),
                });
            }
            SimpleQueryMessage::Row(row) => {
                if let Some(rows) = current.as_mut() {
                    rows.rows.push(
                        (0..row.len())
                            .map(|i| row.get(i).map(str::to_string))
                            .collect(),
                    );
                }
            }
            SimpleQueryMessage::CommandComplete(n) => match current.take() {
                Some(rows) => out.push(Printed::Rows(rows)),
                None => {
                    let tag = command_tag(sql);
                    out.push(Printed::Tag(if tag == "INSERT" {
                        format!("INSERT 0 {n}")
                    } else {
                        tag
                    }));
                }
            },
            _ => {}
        }
    }
    out
}

/// `printed` as `format` prints it.
pub fn render(printed: &Printed, format: Format) -> String {
    match printed {
        Printed::Tag(tag) => format!("{tag}\n"),
        Printed::Rows(rows) => match format {
            Format::Aligned => aligned(rows),
            Format::Csv => csv(rows),
            Format::Json => json(rows),
        },
    }
}

/// An aligned table and its row count.
pub fn aligned(rows: &ResultRows) -> String {
    let mut table = Table::new();
    table.load_style(presets::ASCII_FULL_CONDENSED);
    table.set_header(rows.columns.iter().map(|(name, _)| name.clone()));
    for row in &rows.rows {
        table.add_row(
            row.iter()
                .map(|v| v.clone().unwrap_or_else(|| "NULL".into())),
        );
    }
    let n = rows.rows.len();
    format!("{table}\n({n} row{})\n\n", if n == 1 { "" } else { "s" })
}

fn csv_field(value: &str) -> String {
    if value.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", value.replace('"', "\"\""))
    } else {
        value.to_string()
    }
}

fn csv(rows: &ResultRows) -> String {
    let mut out = String::new();
    let header: Vec<String> = rows.columns.iter().map(|(n, _)| csv_field(n)).collect();
    out.push_str(&header.join(","));
    out.push('\n');
    for row in &rows.rows {
        let fields: Vec<String> = row
            .iter()
            .map(|v| v.as_deref().map(csv_field).unwrap_or_default())
            .collect();
        out.push_str(&fields.join(","));
        out.push('\n');
    }
    out
}

/// A value of type `t`, as JSON: numbers and booleans typed where the text is one.
fn json_value(text: &Option<String>, t: &Type) -> serde_json::Value {
    let Some(text) = text else {
        return serde_json::Value::Null;
    };
    let typed = match *t {
        Type::INT2 | Type::INT4 | Type::INT8 | Type::OID => {
            text.parse::<i64>().ok().map(serde_json::Value::from)
        }
        Type::FLOAT4 | Type::FLOAT8 | Type::NUMERIC => text
            .parse::<f64>()
            .ok()
            .and_then(serde_json::Number::from_f64)
            .map(serde_json::Value::Number),
        Type::BOOL => match text.as_str() {
            "t" | "true" => Some(serde_json::Value::Bool(true)),
            "f" | "false" => Some(serde_json::Value::Bool(false)),
            _ => None,
        },
        _ => None,
    };
    typed.unwrap_or_else(|| serde_json::Value::String(text.clone()))
}

fn json(rows: &ResultRows) -> String {
    let objects: Vec<serde_json::Value> = rows
        .rows
        .iter()
        .map(|row| {
            let fields = rows
                .columns
                .iter()
                .zip(row)
                .map(|((name, t), v)| (name.clone(), json_value(v, t)))
                .collect::<serde_json::Map<_, _>>();
            serde_json::Value::Object(fields)
        })
        .collect();
    format!(
        "{}\n",
        serde_json::to_string(&objects).unwrap_or_else(|_| "[]".into())
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows() -> ResultRows {
        ResultRows {
            columns: vec![
                ("k".into(), Type::INT8),
                ("name".into(), Type::TEXT),
                ("ok".into(), Type::BOOL),
            ],
            rows: vec![
                vec![Some("1".into()), Some("a, \"b\"".into()), Some("t".into())],
                vec![Some("2".into()), None, None],
            ],
        }
    }

    #[test]
    fn results_print_as_aligned_tables_csv_and_json() {
        let printed = Printed::Rows(rows());
        let table = render(&printed, Format::Aligned);
        assert!(table.contains("| k | name   | ok   |"), "{table}");
        assert!(table.contains("| 2 | NULL   | NULL |"), "{table}");
        assert!(table.ends_with("(2 rows)\n\n"), "{table}");
        assert_eq!(
            render(&printed, Format::Csv),
            "k,name,ok\n1,\"a, \"\"b\"\"\",t\n2,,\n"
        );
        assert_eq!(
            render(&printed, Format::Json),
            "[{\"k\":1,\"name\":\"a, \\\"b\\\"\",\"ok\":true},{\"k\":2,\"name\":null,\"ok\":null}]\n"
        );
        assert_eq!(
            render(&Printed::Tag("CREATE SOURCE".into()), Format::Json),
            "CREATE SOURCE\n"
        );
    }
}
