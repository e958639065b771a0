//! Durations as users write them: `'1s'`, `'500 ms'`, `'2 seconds'`, and SQL interval
//! literals such as `INTERVAL '5' SECOND` or `INTERVAL '1 minute'`.

use std::time::Duration;

use datafusion::sql::sqlparser::ast::{self, Expr, Value};

use crate::error::{Result, invalid};

/// Parses a duration such as `100ms`, `1s`, `1.5 s`, `2 seconds`, `1 minute`.
pub fn parse_duration(text: &str) -> Result<Duration> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number.parse().map_err(|_| {
        invalid(format!(
            "invalid duration '{text}': expected e.g. '1s' or '500ms'"
        ))
    })?;
    let unit_nanos = unit_nanos(unit.trim()).ok_or_else(|| {
        invalid(format!(
            "invalid duration '{text}': unknown unit '{}' (use ms, s, m or h)",
            unit.trim()
        ))
    })?;
    let nanos = value * unit_nanos as f64;
    if !(nanos.is_finite() && nanos >= 1.0) {
        return Err(invalid(format!(
            "invalid duration '{text}': must be positive"
        )));
    }
    Ok(Duration::from_nanos(nanos as u64))
}

fn unit_nanos(unit: &str) -> Option<u64> {
    let unit = unit.to_ascii_lowercase();
    Some(match unit.as_str() {
        "ns" | "nanosecond" | "nanoseconds" => 1,
        "us" | "microsecond" | "microseconds" => 1_000,
        "ms" | "millisecond" | "milliseconds" => 1_000_000,
        "" | "s" | "sec" | "secs" | "second" | "seconds" => 1_000_000_000,
        "m" | "min" | "mins" | "minute" | "minutes" => 60_000_000_000,
        "h" | "hour" | "hours" => 3_600_000_000_000,
        "d" | "day" | "days" => 86_400_000_000_000,
        _ => return None,
    })
}

/// Evaluates a constant interval expression such as `INTERVAL '5' SECOND`.
pub fn interval_duration(expr: &Expr) -> Result<Duration> {
    match expr {
        Expr::Interval(interval) => {
            let text = literal_text(&interval.value)
                .ok_or_else(|| invalid(format!("expected a constant interval, found {expr}")))?;
            match &interval.leading_field {
                Some(field) => parse_duration(&format!("{text} {}", field_unit(field)?)),
                None => parse_duration(&text),
            }
        }
        Expr::Value(v) => match &v.value {
            Value::SingleQuotedString(s) => parse_duration(s),
            _ => Err(invalid(format!("expected an interval, found {expr}"))),
        },
        _ => Err(invalid(format!(
            "expected an interval such as INTERVAL '5' SECOND, found {expr}"
        ))),
    }
}

fn literal_text(expr: &Expr) -> Option<String> {
    match expr {
        Expr::Value(v) => match &v.value {
            Value::SingleQuotedString(s) => Some(s.clone()),
            Value::Number(n, _) => Some(n.to_string()),
            _ => None,
        },
        _ => None,
    }
}

fn field_unit(field: &ast::DateTimeField) -> Result<&'static str> {
    use ast::DateTimeField as F;
    Ok(match field {
        F::Millisecond | F::Milliseconds => "ms",
        F::Microsecond | F::Microseconds => "us",
        F::Nanosecond | F::Nanoseconds => "ns",
        F::Second | F::Seconds => "s",
        F::Minute | F::Minutes => "m",
        F::Hour | F::Hours => "h",
        F::Day | F::Days => "d",
        other => {
            return Err(invalid(format!(
                "interval unit {other} is not supported here"
            )));
        }
    })
}

/// Formats a duration the way users write it: `1s`, `250ms`, `2m`.
pub fn format_duration(d: Duration) -> String {
    let nanos = d.as_nanos();
    for (unit, size) in [
        ("h", 3_600_000_000_000u128),
        ("m", 60_000_000_000),
        ("s", 1_000_000_000),
        ("ms", 1_000_000),
        ("us", 1_000),
    ] {
        if nanos >= size && nanos.is_multiple_of(size) {
            return format!("{}{unit}", nanos / size);
        }
    }
    format!("{nanos}ns")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_in_common_spellings() -> Result<()> {
        assert_eq!(parse_duration("1s")?, Duration::from_secs(1));
        assert_eq!(parse_duration("500 ms")?, Duration::from_millis(500));
        assert_eq!(parse_duration("2 seconds")?, Duration::from_secs(2));
        assert_eq!(parse_duration("1.5s")?, Duration::from_millis(1500));
        assert_eq!(parse_duration("1 minute")?, Duration::from_secs(60));
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("3 parsecs").is_err());
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
        assert_eq!(format_duration(Duration::from_secs(120)), "2m");
        Ok(())
    }
}
