//! The `file` connector: a directory watched for new files of JSON lines, CSV or
//! Parquet.
//!
//! At every interval the receiver lists the directory and reads the files it has not
//! seen, in name order; their records form the interval's block. Write files elsewhere
//! and move them in (a rename is atomic), so that no file is read half-written; names
//! starting with `.` or `_` are ignored. Options: `path` (required), `format` (`json`,
//! `csv` or `parquet`), `header` (CSV, default `true`), `delimiter`, `on_error` (`skip`
//! or `fail`).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use dstream_planner::SourceDef;
use dstream_storage::{IntervalId, Timeline};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::connector::decode::{Decoded, OnError, RecordDecoder, TextFormat};
use crate::connector::{Options, Receiver, ReceiverPosition, ReceiverStats};
use crate::error::{Error, Result, config_error};

#[derive(Debug)]
enum FileFormat {
    Text {
        decoder: RecordDecoder,
        header: bool,
    },
    Parquet,
}

/// Reads new files from a directory.
#[derive(Debug)]
pub struct FileReceiver {
    source: String,
    dir: PathBuf,
    schema: SchemaRef,
    format: FileFormat,
    on_error: OnError,
    seen: HashSet<PathBuf>,
    /// Files read since the last `take_new_files`.
    read: Vec<String>,
    stats: ReceiverStats,
}

impl FileReceiver {
    pub fn open(source: &SourceDef, options: &Options) -> Result<Self> {
        let dir = PathBuf::from(
            options
                .get("path")
                .ok_or_else(|| config_error("the file connector needs WITH (path = '/dir')"))?,
        );
        if !dir.is_dir() {
            return Err(config_error(format!(
                "path '{}' is not a directory",
                dir.display()
            )));
        }
        let header = options.get("header").map(|h| h != "false").unwrap_or(true);
        let format = match TextFormat::from_options(options, &["json", "csv", "parquet"])? {
            Some(text) => FileFormat::Text {
                decoder: RecordDecoder::new(source.record_schema.clone(), text),
                header: header && matches!(text, TextFormat::Csv { .. }),
            },
            None => FileFormat::Parquet,
        };
        Ok(FileReceiver {
            source: source.name.clone(),
            dir,
            schema: source.record_schema.clone(),
            format,
            on_error: OnError::from_options(options)?,
            seen: HashSet::new(),
            read: Vec::new(),
            stats: ReceiverStats::default(),
        })
    }

    fn new_files(&mut self) -> Result<Vec<PathBuf>> {
        let mut files = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let path = entry?.path();
            let hidden = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_none_or(|n| n.starts_with('.') || n.starts_with('_'));
            if path.is_file() && !hidden && !self.seen.contains(&path) {
                files.push(path);
            }
        }
        files.sort();
        Ok(files)
    }

    fn read_file(&self, path: &Path) -> Result<Decoded> {
        match &self.format {
            FileFormat::Text { decoder, header } => {
                let data = std::fs::read(path)?;
                let body = if *header {
                    // What follows the header line; nothing if there is no newline.
                    data.splitn(2, |b| *b == b'\n').nth(1).unwrap_or_default()
                } else {
                    &data[..]
                };
                decoder.decode(body)
            }
            FileFormat::Parquet => {
                let data = bytes::Bytes::from(std::fs::read(path)?);
                Ok(
                    decode_parquet(&self.schema, data).unwrap_or_else(|e| Decoded {
                        batches: vec![],
                        malformed: 1,
                        first_error: Some(format!(
                            "unreadable Parquet file {}: {e}",
                            path.display()
                        )),
                    }),
                )
            }
        }
    }
}

/// Decodes the bytes of a Parquet file, taking the columns of `schema` by name. What
/// the Parquet reader cannot make sense of is an error — including a file that makes
/// it panic: the bytes come from outside, so that is contained here.
pub(crate) fn decode_parquet(schema: &SchemaRef, data: bytes::Bytes) -> Result<Decoded> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| read_parquet(schema, data)))
        .unwrap_or_else(|_| {
            Err(Error::Internal(
                "the Parquet reader failed on this file".into(),
            ))
        })
}

/// Reads a Parquet file's bytes, taking the columns of `schema` by name.
fn read_parquet(schema: &SchemaRef, data: bytes::Bytes) -> Result<Decoded> {
    let builder = ParquetRecordBatchReaderBuilder::try_new(data)
        .map_err(|e| Error::Internal(e.to_string()))?;
    let file_schema = builder.schema().clone();
    let reader = builder
        .build()
        .map_err(|e| Error::Internal(e.to_string()))?;
    let mut batches = Vec::new();
    for batch in reader {
        let batch = batch?;
        let columns = schema
            .fields()
            .iter()
            .map(|field| {
                let index = file_schema.index_of(field.name()).map_err(|_| {
                    config_error(format!("the file has no column {}", field.name()))
                })?;
                Ok(arrow::compute::cast(
                    batch.column(index),
                    field.data_type(),
                )?)
            })
            .collect::<Result<Vec<_>>>()?;
        batches.push(RecordBatch::try_new(schema.clone(), columns)?);
    }
    Ok(Decoded {
        batches,
        ..Decoded::default()
    })
}

impl Receiver for FileReceiver {
    fn seal(&mut self, _interval: IntervalId, _timeline: &Timeline) -> Result<Vec<RecordBatch>> {
        let mut out = Vec::new();
        for path in self.new_files()? {
            let origin = path.display().to_string();
            let rows = self.read_file(&path)?.accept(
                &self.source,
                Some(&origin),
                self.on_error,
                &mut self.stats,
            )?;
            out.extend(rows);
            self.read.push(origin);
            self.seen.insert(path);
        }
        Ok(out)
    }

    fn stats(&self) -> ReceiverStats {
        self.stats
    }

    fn release(&mut self) -> ReceiverPosition {
        let mut seen_files: Vec<String> = self
            .seen
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect();
        seen_files.sort();
        ReceiverPosition {
            stats: self.stats,
            seen_files,
            pending: Vec::new(),
        }
    }

    fn resume(&mut self, position: ReceiverPosition) {
        self.stats = position.stats;
        self.seen
            .extend(position.seen_files.into_iter().map(PathBuf::from));
    }

    fn take_new_files(&mut self) -> Vec<String> {
        std::mem::take(&mut self.read)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{Array, Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};
    use parquet::arrow::ArrowWriter;
    use proptest::prelude::*;

    use super::*;

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("k", DataType::Int64, true),
            Field::new("name", DataType::Utf8, true),
        ]))
    }

    fn parquet_file(rows: &[(Option<i64>, Option<String>)]) -> Vec<u8> {
        let batch = RecordBatch::try_new(
            schema(),
            vec![
                Arc::new(rows.iter().map(|r| r.0).collect::<Int64Array>()),
                Arc::new(rows.iter().map(|r| r.1.clone()).collect::<StringArray>()),
            ],
        )
        .expect("batch");
        let mut out = Vec::new();
        let mut writer = ArrowWriter::try_new(&mut out, schema(), None).expect("writer");
        writer.write(&batch).expect("write");
        writer.close().expect("close");
        out
    }

    fn rows_of(decoded: &Decoded) -> Vec<(Option<i64>, Option<String>)> {
        let mut rows = Vec::new();
        for b in &decoded.batches {
            let k = b
                .column(0)
                .as_any()
                .downcast_ref::<Int64Array>()
                .expect("k");
            let name = b
                .column(1)
                .as_any()
                .downcast_ref::<StringArray>()
                .expect("name");
            for i in 0..b.num_rows() {
                rows.push((
                    k.is_valid(i).then(|| k.value(i)),
                    name.is_valid(i).then(|| name.value(i).to_string()),
                ));
            }
        }
        rows
    }

    fn row() -> impl Strategy<Value = (Option<i64>, Option<String>)> {
        (any::<Option<i64>>(), any::<Option<String>>())
    }

    proptest! {
        /// Whatever bytes a file holds, decoding it returns: rows or an error.
        #[test]
        fn parquet_decoding_of_arbitrary_bytes_never_panics(
            data in proptest::collection::vec(any::<u8>(), 0..2000),
        ) {
            let _ = decode_parquet(&schema(), bytes::Bytes::from(data));
        }

        /// A valid file gives its rows back; the same file damaged (bytes flipped or
        /// cut short) gives rows or an error, never a panic.
        #[test]
        fn parquet_files_round_trip_and_damaged_ones_are_errors(
            rows in proptest::collection::vec(row(), 1..50),
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
            cut in any::<prop::sample::Index>(),
        ) {
            let file = parquet_file(&rows);
            let decoded = decode_parquet(&schema(), bytes::Bytes::from(file.clone()))
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(rows_of(&decoded), rows);

            let mut damaged = file.clone();
            for (at, byte) in &flips {
                let i = at.index(damaged.len());
                if let Some(b) = damaged.get_mut(i) {
                    *b ^= byte | 1;
                }
            }
            let _ = decode_parquet(&schema(), bytes::Bytes::from(damaged));
            let short = file.get(..cut.index(file.len())).unwrap_or_default().to_vec();
            let _ = decode_parquet(&schema(), bytes::Bytes::from(short));
        }
    }
}
