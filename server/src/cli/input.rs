//! Splitting what is typed into statements and meta-commands.

/// Splits input into complete statements and meta-commands; returns them and the
/// unfinished rest.
pub fn split_input(buffer: &str) -> (Vec<String>, String) {
    let mut items = Vec::new();
    let mut current = String::new();
    let mut in_quote = false;
    let mut chars = buffer.chars().peekable();
    let mut at_line_start = true;
    while let Some(c) = chars.next() {
        if at_line_start && !in_quote && current.trim().is_empty() && c == '\\' {
            // A meta-command runs to the end of its line.
            let mut meta = String::from("\\");
            for m in chars.by_ref() {
                if m == '\n' {
                    break;
                }
                meta.push(m);
            }
            items.push(meta.trim().to_string());
            current.clear();
            at_line_start = true;
            continue;
        }
        at_line_start = c == '\n';
        if c == '-' && !in_quote && chars.peek() == Some(&'-') {
            // Comment to the end of the line.
            for m in chars.by_ref() {
                if m == '\n' {
                    break;
                }
            }
            current.push('\n');
            at_line_start = true;
            continue;
        }
        current.push(c);
        if c == '\'' {
            in_quote = !in_quote;
        } else if c == ';' && !in_quote {
            let stmt = current.trim().to_string();
            if stmt != ";" {
                items.push(stmt);
            }
            current.clear();
        }
    }
    (items, current)
}

/// A command tag for statements whose result has no rows, as psql prints it.
pub fn command_tag(statement: &str) -> String {
    let words: Vec<String> = statement
        .split_whitespace()
        .take(3)
        .map(|w| w.trim_end_matches(';').to_ascii_uppercase())
        .collect();
    match words.first().map(String::as_str) {
        Some("CREATE" | "DROP") if words.get(1).map(String::as_str) == Some("MATERIALIZED") => {
            words.join(" ")
        }
        Some("CREATE" | "DROP") => words.get(..2).unwrap_or(&words).join(" "),
        Some(first) => first.to_string(),
        None => String::new(),
    }
}

/// Whether `statement` is a `SUBSCRIBE`; the view it subscribes to.
pub fn subscribed_view(statement: &str) -> Option<String> {
    let mut words = statement.split_whitespace();
    if !words.next()?.eq_ignore_ascii_case("subscribe") {
        return None;
    }
    let mut name = words.next()?;
    if name.eq_ignore_ascii_case("to") {
        name = words.next()?;
    }
    Some(name.trim_end_matches(';').to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_splits_into_statements_and_meta_commands() {
        let (items, rest) = split_input("SELECT 'a;b';\n\\d foo\nSELECT 1 -- c;\n, 2;\nSELECT");
        assert_eq!(items, vec!["SELECT 'a;b';", "\\d foo", "SELECT 1 \n, 2;"]);
        assert_eq!(rest.trim(), "SELECT");
        assert_eq!(
            command_tag("create materialized view v as select 1"),
            "CREATE MATERIALIZED VIEW"
        );
        assert_eq!(command_tag("insert into t values (1)"), "INSERT");
        assert_eq!(
            subscribed_view("SUBSCRIBE TO counts;"),
            Some("counts".into())
        );
        assert_eq!(subscribed_view("subscribe counts"), Some("counts".into()));
        assert_eq!(subscribed_view("SELECT 1"), None);
    }
}
