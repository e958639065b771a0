//! Decoding newline-delimited records (JSON or CSV) into Arrow batches, with arrow-json
//! and arrow-csv, and the malformed-record policy.
//!
//! A chunk is first decoded whole. Only if that fails is it decoded line by line, to
//! find the malformed lines; the good lines are then decoded together. Under
//! `on_error = 'skip'` malformed lines are dropped and counted; under `'fail'` the
//! source fails with the first malformed line in its message.

use std::borrow::Cow;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use arrow::error::ArrowError;

use tracing::warn;

use crate::connector::{Options, ReceiverStats};
use crate::error::{Error, Result, config_error};

/// The text formats records arrive in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TextFormat {
    Json,
    Csv { delimiter: u8 },
}

/// What to do with a record that does not decode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnError {
    /// Drop it and count it (the default).
    Skip,
    /// Fail the source.
    Fail,
}

impl OnError {
    pub fn from_options(options: &Options) -> Result<Self> {
        match options.get("on_error").unwrap_or("skip") {
            "skip" => Ok(OnError::Skip),
            "fail" => Ok(OnError::Fail),
            other => Err(config_error(format!(
                "on_error = '{other}' is unknown; use 'skip' or 'fail'"
            ))),
        }
    }
}

impl TextFormat {
    /// The `format` option (`json` or `csv`, with `delimiter` for CSV).
    pub fn from_options(options: &Options, allowed: &[&str]) -> Result<Option<Self>> {
        let format = options.get("format").unwrap_or("json");
        match format {
            "json" => Ok(Some(TextFormat::Json)),
            "csv" => {
                let delimiter = options.get("delimiter").unwrap_or(",");
                let &[delimiter] = delimiter.as_bytes() else {
                    return Err(config_error(format!(
                        "delimiter = '{delimiter}' must be a single character"
                    )));
                };
                Ok(Some(TextFormat::Csv { delimiter }))
            }
            other if allowed.contains(&other) => Ok(None),
            other => Err(config_error(format!(
                "format = '{other}' is unknown; use {}",
                allowed.join(", ")
            ))),
        }
    }
}

/// The result of decoding one chunk.
#[derive(Debug, Default)]
pub struct Decoded {
    pub batches: Vec<RecordBatch>,
    pub malformed: u64,
    /// The first malformed line and why, for messages.
    pub first_error: Option<String>,
}

/// Decodes newline-delimited records of one schema.
#[derive(Clone, Debug)]
pub struct RecordDecoder {
    schema: SchemaRef,
    format: TextFormat,
}

const BATCH_ROWS: usize = 8192;

/// arrow-json's and arrow-csv's push decoders: bytes in, batches out.
trait PushDecoder {
    fn push(&mut self, data: &[u8]) -> std::result::Result<usize, ArrowError>;
    fn take(&mut self) -> std::result::Result<Option<RecordBatch>, ArrowError>;
}

impl PushDecoder for arrow::json::reader::Decoder {
    fn push(&mut self, data: &[u8]) -> std::result::Result<usize, ArrowError> {
        self.decode(data)
    }
    fn take(&mut self) -> std::result::Result<Option<RecordBatch>, ArrowError> {
        self.flush()
    }
}

impl PushDecoder for arrow::csv::reader::Decoder {
    fn push(&mut self, data: &[u8]) -> std::result::Result<usize, ArrowError> {
        self.decode(data)
    }
    fn take(&mut self) -> std::result::Result<Option<RecordBatch>, ArrowError> {
        self.flush()
    }
}

/// Feeds all of `data` to `decoder`, taking each batch as it fills. A push that
/// consumes nothing means the input is used up (the empty push also ends a last
/// CSV record).
fn drain(
    mut decoder: impl PushDecoder,
    data: &[u8],
) -> std::result::Result<Vec<RecordBatch>, ArrowError> {
    let mut out = Vec::new();
    let mut offset = 0;
    loop {
        let read = decoder.push(data.get(offset..).unwrap_or_default())?;
        offset = offset.saturating_add(read);
        if let Some(batch) = decoder.take()? {
            out.push(batch);
        }
        if read == 0 {
            return Ok(out);
        }
    }
}

impl RecordDecoder {
    pub fn new(schema: SchemaRef, format: TextFormat) -> Self {
        RecordDecoder { schema, format }
    }

    fn decode_all(&self, data: &[u8]) -> std::result::Result<Vec<RecordBatch>, ArrowError> {
        let batches = match self.format {
            TextFormat::Json => drain(
                arrow::json::ReaderBuilder::new(self.schema.clone())
                    .with_batch_size(BATCH_ROWS)
                    .build_decoder()?,
                data,
            )?,
            TextFormat::Csv { delimiter } => drain(
                arrow::csv::ReaderBuilder::new(self.schema.clone())
                    .with_header(false)
                    .with_delimiter(delimiter)
                    .with_batch_size(BATCH_ROWS)
                    .build_decoder(),
                data,
            )?,
        };
        Ok(batches.into_iter().filter(|b| b.num_rows() > 0).collect())
    }

    /// Decodes complete lines; blank lines are ignored.
    pub fn decode(&self, data: &[u8]) -> Result<Decoded> {
        if data.iter().all(|b| b.is_ascii_whitespace()) {
            return Ok(Decoded::default());
        }
        // The decoders need the last record terminated; copy only if it is not.
        let terminated: Cow<[u8]> = if data.last() == Some(&b'\n') {
            Cow::Borrowed(data)
        } else {
            let mut owned = data.to_vec();
            owned.push(b'\n');
            Cow::Owned(owned)
        };
        // arrow-json reads a stream of values and forgives what is not JSON (a
        // missing comma, two objects on one line): each line must first be exactly
        // one JSON value.
        let strict = self.format != TextFormat::Json
            || terminated
                .split(|b| *b == b'\n')
                .all(|l| json_line_error(l).is_none());
        if strict && let Ok(batches) = self.decode_all(&terminated) {
            return Ok(Decoded {
                batches,
                ..Decoded::default()
            });
        }
        // Slow path: find the malformed lines.
        let mut good = Vec::with_capacity(terminated.len());
        let mut decoded = Decoded::default();
        for line in terminated.split(|b| *b == b'\n') {
            if line.iter().all(|b| b.is_ascii_whitespace()) {
                continue;
            }
            if self.format == TextFormat::Json
                && let Some(e) = json_line_error(line)
            {
                decoded.record_error(line, &format!("not JSON: {e}"));
                continue;
            }
            let mut one = line.to_vec();
            one.push(b'\n');
            match self.decode_all(&one) {
                Ok(batches) if batches.iter().map(|b| b.num_rows()).sum::<usize>() == 1 => {
                    good.extend_from_slice(&one)
                }
                Ok(_) => decoded.record_error(line, "not exactly one record"),
                Err(e) => decoded.record_error(line, &e.to_string()),
            }
        }
        decoded.batches = self.decode_all(&good).map_err(|e| {
            Error::Internal(format!("lines that decode alone failed together: {e}"))
        })?;
        Ok(decoded)
    }
}

/// Why `line` is not exactly one JSON value (blank lines are no record at all).
fn json_line_error(line: &[u8]) -> Option<serde_json::Error> {
    if line.iter().all(|b| b.is_ascii_whitespace()) {
        return None;
    }
    serde_json::from_slice::<serde::de::IgnoredAny>(line).err()
}

impl Decoded {
    /// Applies the malformed-record policy and counts into `stats`: under `Fail` a
    /// malformed record fails the source (naming it, and `origin` such as its file);
    /// under `Skip` it is logged and dropped. Returns the good rows.
    pub fn accept(
        self,
        source: &str,
        origin: Option<&str>,
        on_error: OnError,
        stats: &mut ReceiverStats,
    ) -> Result<Vec<RecordBatch>> {
        if let Some(first) = &self.first_error {
            let first = match origin {
                Some(origin) => format!("{origin}: {first}"),
                None => first.clone(),
            };
            if on_error == OnError::Fail {
                return Err(Error::SourceFailed {
                    source_name: source.to_string(),
                    reason: first,
                });
            }
            warn!(source = %source, skipped = self.malformed, "{first}");
        }
        stats.malformed = stats.malformed.saturating_add(self.malformed);
        stats.records = stats.records.saturating_add(
            self.batches
                .iter()
                .map(|b| b.num_rows() as u64)
                .sum::<u64>(),
        );
        Ok(self.batches)
    }

    fn record_error(&mut self, line: &[u8], reason: &str) {
        self.malformed = self.malformed.saturating_add(1);
        if self.first_error.is_none() {
            let text: String = String::from_utf8_lossy(line).chars().take(200).collect();
            self.first_error = Some(format!("malformed record {text:?}: {reason}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::Array;
    use arrow::datatypes::{DataType, Field, Schema};

    use super::*;

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("a", DataType::Int64, true),
            Field::new("b", DataType::Utf8, true),
        ]))
    }

    #[test]
    fn good_json_decodes_in_one_pass() -> Result<()> {
        let d = RecordDecoder::new(schema(), TextFormat::Json);
        let out = d.decode(b"{\"a\": 1, \"b\": \"x\"}\n{\"a\": 2}\n\n")?;
        assert_eq!(out.malformed, 0);
        assert_eq!(out.batches.iter().map(|b| b.num_rows()).sum::<usize>(), 2);
        Ok(())
    }

    proptest::proptest! {
        /// Whatever bytes arrive, decoding returns; every line is a good record or a
        /// malformed one.
        #[test]
        fn any_bytes_decode_or_count_as_malformed(
            data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400),
        ) {
            for format in [TextFormat::Json, TextFormat::Csv { delimiter: b',' }] {
                let lines = data
                    .split(|b| *b == b'\n')
                    .filter(|l| !l.iter().all(|b| b.is_ascii_whitespace()))
                    .count();
                let out = RecordDecoder::new(schema(), format).decode(&data);
                if let Ok(out) = out {
                    // One record per line at most; CSV's quoted fields may span lines.
                    let rows: usize = out.batches.iter().map(|b| b.num_rows()).sum();
                    proptest::prop_assert!(rows + out.malformed as usize <= lines);
                }
            }
        }

        /// Lines that are JSON objects of the declared columns all decode, values intact.
        #[test]
        fn valid_json_lines_all_decode(
            rows in proptest::collection::vec(
                (proptest::prelude::any::<Option<i64>>(), proptest::prelude::any::<Option<String>>()),
                0..40,
            ),
        ) {
            let mut text = String::new();
            for (a, b) in &rows {
                text.push_str(&serde_json::json!({"a": a, "b": b}).to_string());
                text.push('\n');
            }
            let out = RecordDecoder::new(schema(), TextFormat::Json).decode(text.as_bytes())?;
            proptest::prop_assert_eq!(out.malformed, 0);
            let decoded: usize = out.batches.iter().map(|b| b.num_rows()).sum();
            proptest::prop_assert_eq!(decoded, rows.len());
            let batch = arrow::compute::concat_batches(&schema(), &out.batches)?;
            if !rows.is_empty() {
                let a = batch.column(0).as_any().downcast_ref::<arrow::array::Int64Array>();
                let b = batch.column(1).as_any().downcast_ref::<arrow::array::StringArray>();
                let (Some(a), Some(b)) = (a, b) else {
                    return Err(proptest::test_runner::TestCaseError::fail("column types"));
                };
                for (i, (x, y)) in rows.iter().enumerate() {
                    proptest::prop_assert_eq!(a.is_valid(i).then(|| a.value(i)), *x);
                    proptest::prop_assert_eq!(b.is_valid(i).then(|| b.value(i).to_string()), y.clone());
                }
            }
        }
    }

    #[test]
    fn malformed_lines_are_isolated_and_counted() -> Result<()> {
        let d = RecordDecoder::new(schema(), TextFormat::Json);
        let out = d.decode(b"{\"a\": 1}\nnot json\n{\"a\": \"seven\"}\n{\"a\": 3}")?;
        assert_eq!(out.malformed, 2);
        assert_eq!(out.batches.iter().map(|b| b.num_rows()).sum::<usize>(), 2);
        assert!(out.first_error.is_some_and(|e| e.contains("not json")));

        // What arrow-json alone would take: a missing comma, two objects on a line,
        // a trailing comma, single quotes.
        let out = d.decode(
            b"{\"a\": 1 \"b\": \"x\"}\n{\"a\": 2}{\"a\": 3}\n{\"a\": 4,}\n{'a': 5}\n{\"a\": 6}\n",
        )?;
        assert_eq!(out.malformed, 4, "{:?}", out.first_error);
        assert_eq!(out.batches.iter().map(|b| b.num_rows()).sum::<usize>(), 1);
        assert!(out.first_error.is_some_and(|e| e.contains("not JSON")));

        let d = RecordDecoder::new(schema(), TextFormat::Csv { delimiter: b',' });
        let out = d.decode(b"1,x\noops,y\n2,z\n3\n")?;
        assert_eq!(out.malformed, 2);
        assert_eq!(out.batches.iter().map(|b| b.num_rows()).sum::<usize>(), 2);
        Ok(())
    }
}
