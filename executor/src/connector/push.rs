//! The `http` connector: records pushed to the coordinator (`POST /v1/sources/{name}`)
//! rather than read by the receiver.
//!
//! The coordinator decodes each request body into the source's record schema
//! ([`decode_body`]) and keeps what it accepted until an interval's seal carries it
//! to the source's receiver, a [`PushReceiver`], which seals it as the interval's
//! block (replicated like any block). The coordinator forgets the records only once
//! that seal is recorded, so a worker lost before then loses nothing: the seal is
//! done again, with the same records, wherever the receiver is reopened.
//!
//! Options: `max_pending_rows` and `max_pending_bytes`, the bound on records accepted
//! but not sealed yet ([`PushLimits`]), over which requests are refused (HTTP 429)
//! until the engine catches up; `on_error` (`skip`: malformed lines are dropped and
//! counted; `fail`: a body with a malformed line is refused whole); `delimiter` for
//! CSV bodies.

use arrow::array::RecordBatch;
use arrow::compute::cast;
use arrow::datatypes::SchemaRef;
use dstream_planner::SourceDef;
use dstream_storage::{IntervalId, Timeline};

use crate::connector::decode::{OnError, RecordDecoder, TextFormat};
use crate::connector::{Options, Receiver, ReceiverPosition, ReceiverStats};
use crate::error::{Error, Result, config_error};

/// Default of [`PushLimits::max_rows`].
pub const DEFAULT_MAX_PENDING_ROWS: u64 = 1_000_000;
/// Default of [`PushLimits::max_bytes`]: 64 MiB.
pub const DEFAULT_MAX_PENDING_BYTES: u64 = 64 << 20;

/// The most [`PushLimits::max_bytes`] may be: a seal carries what the source holds in
/// one message to the receiver's worker (see `rpc::MAX_MESSAGE_BYTES`).
pub const MAX_PENDING_BYTES_LIMIT: u64 = 128 << 20;

/// How much a pushed source may hold accepted but not sealed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PushLimits {
    pub max_rows: u64,
    pub max_bytes: u64,
}

impl Default for PushLimits {
    fn default() -> Self {
        PushLimits {
            max_rows: DEFAULT_MAX_PENDING_ROWS,
            max_bytes: DEFAULT_MAX_PENDING_BYTES,
        }
    }
}

/// The options of an `http` source, checked.
#[derive(Clone, Copy, Debug)]
pub struct PushOptions {
    pub limits: PushLimits,
    pub on_error: OnError,
    pub delimiter: u8,
}

impl PushOptions {
    pub fn from_options(options: &Options) -> Result<Self> {
        let limits = PushLimits {
            max_rows: options.number("max_pending_rows", DEFAULT_MAX_PENDING_ROWS)?,
            max_bytes: options.number("max_pending_bytes", DEFAULT_MAX_PENDING_BYTES)?,
        };
        if limits.max_rows == 0 || limits.max_bytes == 0 {
            return Err(config_error(
                "max_pending_rows and max_pending_bytes must be positive",
            ));
        }
        if limits.max_bytes > MAX_PENDING_BYTES_LIMIT {
            return Err(config_error(format!(
                "max_pending_bytes = {} is over the most a seal carries, {MAX_PENDING_BYTES_LIMIT}",
                limits.max_bytes
            )));
        }
        let delimiter = options.get("delimiter").unwrap_or(",");
        let &[delimiter] = delimiter.as_bytes() else {
            return Err(config_error(format!(
                "delimiter = '{delimiter}' must be a single character"
            )));
        };
        Ok(PushOptions {
            limits,
            on_error: OnError::from_options(options)?,
            delimiter,
        })
    }

    /// The options of `source`, which must be an `http` source.
    pub fn of(source: &SourceDef) -> Result<Self> {
        let options = Options::new(&source.connector.options);
        let parsed = PushOptions::from_options(&options)?;
        options.check_all_used(&source.connector.connector)?;
        Ok(parsed)
    }
}

/// The formats a pushed body comes in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyFormat {
    /// Newline-delimited JSON objects.
    Json,
    /// CSV lines without a header, columns in declared order.
    Csv,
    /// An Arrow IPC stream whose columns are the source's, by name.
    Arrow,
}

impl BodyFormat {
    /// The format of a body of media type `media` (without parameters, lower case);
    /// `None` when no format fits.
    pub fn of_media_type(media: Option<&str>) -> Option<Self> {
        match media {
            None
            | Some("application/x-ndjson")
            | Some("application/jsonl")
            | Some("application/json")
            | Some("application/x-www-form-urlencoded")
            | Some("text/plain") => Some(BodyFormat::Json),
            Some("text/csv") => Some(BodyFormat::Csv),
            Some("application/vnd.apache.arrow.stream") => Some(BodyFormat::Arrow),
            Some(_) => None,
        }
    }
}

/// What a body decoded to: the records, and the malformed lines dropped.
#[derive(Debug, Default)]
pub struct DecodedBody {
    pub batches: Vec<RecordBatch>,
    pub malformed: u64,
}

impl DecodedBody {
    pub fn rows(&self) -> u64 {
        self.batches.iter().map(|b| b.num_rows() as u64).sum()
    }

    pub fn bytes(&self) -> u64 {
        self.batches
            .iter()
            .map(|b| b.get_array_memory_size() as u64)
            .sum()
    }
}

/// Decodes a body pushed to `source` (its record `schema`). A malformed line is an
/// error under `on_error = 'fail'` (naming the line: nothing of the body is taken),
/// and dropped and counted under `'skip'`. An Arrow stream must have the source's
/// columns by name (nullable ones may be missing), in types that cast to theirs.
pub fn decode_body(
    source: &str,
    schema: &SchemaRef,
    options: &PushOptions,
    format: BodyFormat,
    body: &[u8],
) -> Result<DecodedBody> {
    let text = |format| -> Result<DecodedBody> {
        let decoded = RecordDecoder::new(schema.clone(), format).decode(body)?;
        if let (Some(first), OnError::Fail) = (&decoded.first_error, options.on_error) {
            return Err(Error::BadRecords(format!(
                "a record pushed to {source} is malformed, so none of the body was taken: {first}"
            )));
        }
        Ok(DecodedBody {
            batches: decoded.batches,
            malformed: decoded.malformed,
        })
    };
    match format {
        BodyFormat::Json => text(TextFormat::Json),
        BodyFormat::Csv => text(TextFormat::Csv {
            delimiter: options.delimiter,
        }),
        BodyFormat::Arrow => {
            // The push decoder holds only the bytes that arrived: a message header
            // claiming a huge body allocates nothing (the stream reader would).
            let bad = |e: arrow::error::ArrowError| {
                Error::BadRecords(format!("the body is not an Arrow IPC stream: {e}"))
            };
            let mut decoder = arrow::ipc::reader::StreamDecoder::new();
            let mut buffer = arrow::buffer::Buffer::from_vec(body.to_vec());
            let mut batches = Vec::new();
            while !buffer.is_empty() {
                if let Some(batch) = decoder.decode(&mut buffer).map_err(bad)? {
                    let batch = conform(source, schema, &batch)?;
                    if batch.num_rows() > 0 {
                        batches.push(batch);
                    }
                }
            }
            decoder.finish().map_err(bad)?;
            Ok(DecodedBody {
                batches,
                malformed: 0,
            })
        }
    }
}

/// `batch` with the columns of `schema`, by name, cast to their types.
fn conform(source: &str, schema: &SchemaRef, batch: &RecordBatch) -> Result<RecordBatch> {
    let given = batch.schema();
    if let Some(extra) = given
        .fields()
        .iter()
        .find(|f| schema.field_with_name(f.name()).is_err())
    {
        return Err(Error::BadRecords(format!(
            "source {source} has no column \"{}\"",
            extra.name()
        )));
    }
    let columns = schema
        .fields()
        .iter()
        .map(|field| match given.index_of(field.name()) {
            Ok(i) => {
                let column = batch.column(i);
                if column.data_type() == field.data_type() {
                    return Ok(column.clone());
                }
                cast(column, field.data_type()).map_err(|e| {
                    Error::BadRecords(format!(
                        "column \"{}\" of source {source} is {}, and {} does not cast to it: {e}",
                        field.name(),
                        field.data_type(),
                        column.data_type()
                    ))
                })
            }
            Err(_) if field.is_nullable() => Ok(arrow::array::new_null_array(
                field.data_type(),
                batch.num_rows(),
            )),
            Err(_) => Err(Error::BadRecords(format!(
                "column \"{}\" of source {source} is NOT NULL and missing from the body",
                field.name()
            ))),
        })
        .collect::<Result<Vec<_>>>()?;
    RecordBatch::try_new(schema.clone(), columns).map_err(|e| Error::BadRecords(e.to_string()))
}

/// The receiver of an `http` source: it seals what the seal request carried.
#[derive(Debug)]
pub struct PushReceiver {
    pending: Vec<RecordBatch>,
    stats: ReceiverStats,
}

impl PushReceiver {
    pub fn open(options: &Options) -> Result<Self> {
        PushOptions::from_options(options)?;
        Ok(PushReceiver {
            pending: Vec::new(),
            stats: ReceiverStats::default(),
        })
    }
}

impl Receiver for PushReceiver {
    fn seal(&mut self, _interval: IntervalId, _timeline: &Timeline) -> Result<Vec<RecordBatch>> {
        Ok(std::mem::take(&mut self.pending))
    }

    fn stats(&self) -> ReceiverStats {
        self.stats
    }

    fn release(&mut self) -> ReceiverPosition {
        ReceiverPosition::counters(self.stats)
    }

    fn resume(&mut self, position: ReceiverPosition) {
        self.stats = position.stats;
    }

    fn push(&mut self, batches: Vec<RecordBatch>, malformed: u64) -> Result<()> {
        let rows: u64 = batches.iter().map(|b| b.num_rows() as u64).sum();
        self.stats.records = self.stats.records.saturating_add(rows);
        self.stats.malformed = self.stats.malformed.saturating_add(malformed);
        self.pending.extend(batches);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use arrow::array::{Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};

    use super::*;

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("name", DataType::Utf8, true),
        ]))
    }

    fn options(pairs: &[(&str, &str)]) -> PushOptions {
        let values: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        PushOptions::from_options(&Options::new(&values)).expect("options")
    }

    #[test]
    fn bodies_decode_as_json_csv_and_arrow() {
        let skip = options(&[]);
        let json = decode_body(
            "s",
            &schema(),
            &skip,
            BodyFormat::Json,
            b"{\"id\": 1, \"name\": \"a\"}\nnot json\n{\"id\": 2}\n",
        )
        .expect("json");
        assert_eq!((json.rows(), json.malformed), (2, 1));
        let csv = decode_body("s", &schema(), &skip, BodyFormat::Csv, b"1,a\n2,b\n").expect("csv");
        assert_eq!(csv.rows(), 2);

        // Arrow: columns by name, cast, a nullable one missing.
        let given = Arc::new(Schema::new(vec![Field::new("id", DataType::Utf8, false)]));
        let batch = RecordBatch::try_new(
            given.clone(),
            vec![Arc::new(StringArray::from(vec!["7", "8"]))],
        )
        .expect("batch");
        let mut body = Vec::new();
        let mut writer =
            arrow::ipc::writer::StreamWriter::try_new(&mut body, &given).expect("writer");
        writer.write(&batch).expect("write");
        writer.finish().expect("finish");
        drop(writer);
        let arrow = decode_body("s", &schema(), &skip, BodyFormat::Arrow, &body).expect("arrow");
        let ids = arrow.batches[0]
            .column(0)
            .as_any()
            .downcast_ref::<Int64Array>()
            .expect("ids");
        assert_eq!(ids.values(), &[7, 8]);
        assert_eq!(arrow.batches[0].column(1).null_count(), 2);
    }

    #[test]
    fn a_malformed_line_refuses_the_body_under_fail() {
        let fail = options(&[("on_error", "fail")]);
        let e = decode_body(
            "s",
            &schema(),
            &fail,
            BodyFormat::Json,
            b"{\"id\": 1}\n{\"id\": \n",
        )
        .expect_err("refused");
        assert!(e.to_string().contains("none of the body was taken"), "{e}");
        let e = decode_body("s", &schema(), &fail, BodyFormat::Arrow, b"not arrow")
            .expect_err("refused");
        assert!(e.to_string().contains("not an Arrow IPC stream"), "{e}");
        // A stream cut short: an error, not a wait or a panic.
        let schema = schema();
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(Int64Array::from(vec![1])),
                Arc::new(StringArray::from(vec!["a"])),
            ],
        )
        .expect("batch");
        let mut body = Vec::new();
        let mut writer =
            arrow::ipc::writer::StreamWriter::try_new(&mut body, &schema).expect("writer");
        writer.write(&batch).expect("write");
        writer.finish().expect("finish");
        drop(writer);
        let cut = body.get(..body.len() - 20).expect("cut");
        assert!(decode_body("s", &schema, &fail, BodyFormat::Arrow, cut).is_err());
    }
}
