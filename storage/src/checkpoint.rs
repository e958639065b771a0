//! Checkpoints: the state of every view partition, written to the object store, and
//! the manifest that commits them.
//!
//! # Format (version 2)
//!
//! ```text
//! checkpoints/<interval>/<view>/<partition>/<table>.arrow     a table the stage's operator keeps
//! checkpoints/<interval>/<view>/<partition>/view.arrow        the partition's view rows
//! checkpoints/<interval>/<view>/<partition>/written.json      the partition is whole
//! manifests/<interval>.json                                   the commit point
//! ```
//!
//! `<view>` is a view stage. Its operator declares the tables it keeps (for
//! example `rows`, the accumulators of an aggregate; `running`, a sliding window's
//! running values; `distinct-<k>`, the pairs of the k-th `count(DISTINCT)`; `kept`,
//! the rows a keyed operator keeps); no table is named `view`.
//! `<interval>` is the interval id, zero-padded to 20 digits so that names sort by
//! interval. Each `.arrow` file is an Arrow IPC file; an empty part has no file. Every
//! worker writes the partitions it owns, as committed by the interval; when all are
//! written the coordinator writes the manifest with create-if-absent: a checkpoint
//! exists exactly when its manifest does, and files without a manifest are leftovers
//! of a checkpoint that did not complete. The manifest ([`Manifest`]) lists every file
//! with its size, so a reader can tell a complete checkpoint from a damaged one.
//!
//! A worker also writes each partition's record ([`WrittenPartition`]) once its files
//! are written. Resuming never reads it; but when a worker dies while a checkpoint is
//! being written, so that the checkpoint never commits, recovery loads the lost
//! partitions that the record shows whole from it, instead of from the checkpoint
//! before.

use std::collections::BTreeMap;
use std::io::Cursor;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use arrow::ipc::reader::FileReader;
use arrow::ipc::writer::FileWriter;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::data_dir::DataDir;
use crate::error::{Error, Result};
use crate::ids::IntervalId;

/// The version of the checkpoint format this build writes and reads.
pub const FORMAT_VERSION: u32 = 2;

const CHECKPOINTS: &str = "checkpoints";
const MANIFESTS: &str = "manifests";

/// The directory of one checkpoint's partition files.
pub fn checkpoint_dir(interval: IntervalId) -> String {
    format!("{CHECKPOINTS}/{:020}", interval.0)
}

/// The directory of one partition's files in the checkpoint of `interval`.
pub fn partition_dir(interval: IntervalId, view: &str, partition: u32) -> String {
    format!("{}/{view}/{partition}", checkpoint_dir(interval))
}

pub fn manifest_path(interval: IntervalId) -> String {
    format!("{MANIFESTS}/{:020}.json", interval.0)
}

/// The part name of a partition's view rows; every other part is a state table.
pub const VIEW_ROWS: &str = "view";

/// One file of a checkpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointFile {
    /// Relative to the store root.
    pub path: String,
    /// The state table it holds, or [`VIEW_ROWS`].
    pub part: String,
    pub bytes: u64,
    pub rows: u64,
}

/// Writes `batches` as an Arrow IPC file: one part (a state table, or the view
/// rows) of one partition. Nothing is written for no batches.
pub async fn write_part(
    dir: &DataDir,
    interval: IntervalId,
    view: &str,
    partition: u32,
    part: &str,
    batches: &[RecordBatch],
) -> Result<Option<CheckpointFile>> {
    let Some(schema) = batches.first().map(|b| b.schema()) else {
        return Ok(None);
    };
    let bytes = ipc_file(&schema, batches)?;
    let path = format!(
        "{}/{}.arrow",
        partition_dir(interval, view, partition),
        part
    );
    let size = bytes.len() as u64;
    dir.put(&path, bytes).await?;
    Ok(Some(CheckpointFile {
        path,
        part: part.to_string(),
        bytes: size,
        rows: batches.iter().map(|b| b.num_rows() as u64).sum(),
    }))
}

fn ipc_file(schema: &SchemaRef, batches: &[RecordBatch]) -> Result<Bytes> {
    let mut buf = Vec::new();
    {
        let mut writer = FileWriter::try_new(&mut buf, schema)?;
        for batch in batches {
            writer.write(batch)?;
        }
        writer.finish()?;
    }
    Ok(Bytes::from(buf))
}

/// Reads one file of a checkpoint, checking it against what the manifest says.
pub async fn read_part(dir: &DataDir, file: &CheckpointFile) -> Result<Vec<RecordBatch>> {
    let corrupt = |reason: String| Error::Corrupt {
        what: file.path.clone(),
        reason,
    };
    let bytes = dir
        .get(&file.path)
        .await?
        .ok_or_else(|| corrupt("the file is missing".into()))?;
    if bytes.len() as u64 != file.bytes {
        return Err(corrupt(format!(
            "{} bytes, the manifest says {}",
            bytes.len(),
            file.bytes
        )));
    }
    let batches = FileReader::try_new(Cursor::new(bytes), None)
        .and_then(|reader| reader.collect::<std::result::Result<Vec<_>, _>>())
        .map_err(|e| corrupt(e.to_string()))?;
    let rows: u64 = batches.iter().map(|b| b.num_rows() as u64).sum();
    if rows != file.rows {
        return Err(corrupt(format!(
            "{rows} rows, the manifest says {}",
            file.rows
        )));
    }
    Ok(batches)
}

/// One state partition in a checkpoint.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionCheckpoint {
    pub partition: u32,
    pub files: Vec<CheckpointFile>,
    pub emitted_until: Option<i64>,
    pub watermark: Option<i64>,
    pub view_rows: u64,
}

/// The record a worker writes once a partition's files in a checkpoint are written:
/// the partition is whole, even if the checkpoint never commits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WrittenPartition {
    /// The view's `CREATE` statement, as in [`ViewCheckpoint`].
    pub sql: String,
    pub partition: PartitionCheckpoint,
}

impl WrittenPartition {
    fn path(interval: IntervalId, view: &str, partition: u32) -> String {
        format!("{}/written.json", partition_dir(interval, view, partition))
    }

    /// Writes the record of `view`'s partition in the checkpoint of `interval`.
    pub async fn write(&self, dir: &DataDir, interval: IntervalId, view: &str) -> Result<()> {
        let json = serde_json::to_vec(self).map_err(|e| Error::Corrupt {
            what: "partition record".into(),
            reason: e.to_string(),
        })?;
        let path = WrittenPartition::path(interval, view, self.partition.partition);
        dir.put(&path, Bytes::from(json)).await
    }

    /// Reads the record of `view`'s `partition` in the checkpoint of `interval`, if
    /// it was written.
    pub async fn read(
        dir: &DataDir,
        interval: IntervalId,
        view: &str,
        partition: u32,
    ) -> Result<Option<WrittenPartition>> {
        let path = WrittenPartition::path(interval, view, partition);
        let Some(bytes) = dir.get(&path).await? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| Error::Corrupt {
                what: path,
                reason: e.to_string(),
            })
    }
}

/// One view in a checkpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViewCheckpoint {
    /// The view's `CREATE` statement: a view dropped and re-created under the same
    /// name does not resume from the old one's state.
    pub sql: String,
    pub partitions: Vec<PartitionCheckpoint>,
}

/// Where a source stood after the checkpoint's interval.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceCheckpoint {
    /// The source's `CREATE` statement: a source dropped and re-created under the
    /// same name does not resume from the old one's position.
    #[serde(default)]
    pub sql: String,
    pub records: u64,
    pub malformed: u64,
    pub late_rows: u64,
    pub watermark: Option<i64>,
    /// File sources: the files read by then.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub seen_files: Vec<String>,
}

/// The commit point of a checkpoint: everything needed to resume from it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub version: u32,
    /// The interval whose committed state the checkpoint holds.
    pub interval: u64,
    pub origin_nanos: i64,
    pub width_nanos: i64,
    /// When the manifest was written (RFC 3339, UTC).
    pub created_at: String,
    pub views: BTreeMap<String, ViewCheckpoint>,
    pub sources: BTreeMap<String, SourceCheckpoint>,
}

impl Manifest {
    /// Bytes of all the checkpoint's files.
    pub fn bytes(&self) -> u64 {
        self.files().map(|f| f.bytes).sum()
    }

    pub fn files(&self) -> impl Iterator<Item = &CheckpointFile> {
        self.views
            .values()
            .flat_map(|v| v.partitions.iter())
            .flat_map(|p| p.files.iter())
    }

    /// Commits the checkpoint: writes the manifest if none exists for its interval.
    /// `false` if one already did (a checkpoint of that interval was committed before).
    pub async fn commit(&self, dir: &DataDir) -> Result<bool> {
        let json = serde_json::to_vec_pretty(self).map_err(|e| Error::Corrupt {
            what: "manifest".into(),
            reason: e.to_string(),
        })?;
        dir.put_if_absent(&manifest_path(IntervalId(self.interval)), Bytes::from(json))
            .await
    }

    /// Reads the manifest of `interval`, if there is one.
    pub async fn load(dir: &DataDir, interval: IntervalId) -> Result<Option<Manifest>> {
        let path = manifest_path(interval);
        let Some(bytes) = dir.get(&path).await? else {
            return Ok(None);
        };
        let corrupt = |reason: String| Error::Corrupt {
            what: path.clone(),
            reason,
        };
        let value: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
        let version = value.get("version").and_then(|v| v.as_u64());
        if version != Some(u64::from(FORMAT_VERSION)) {
            let found = version.map_or_else(|| "missing".to_string(), |v| v.to_string());
            return Err(corrupt(format!(
                "checkpoint format version {found} is not supported (this build reads {FORMAT_VERSION})"
            )));
        }
        serde_json::from_value(value)
            .map(Some)
            .map_err(|e| corrupt(e.to_string()))
    }

    /// The intervals of every committed checkpoint, oldest first.
    pub async fn list(dir: &DataDir) -> Result<Vec<IntervalId>> {
        let mut intervals: Vec<IntervalId> = dir
            .list(MANIFESTS)
            .await?
            .iter()
            .filter_map(|l| {
                l.path
                    .strip_prefix(&format!("{MANIFESTS}/"))?
                    .strip_suffix(".json")?
                    .parse()
                    .ok()
                    .map(IntervalId)
            })
            .collect();
        intervals.sort();
        Ok(intervals)
    }

    /// The newest committed checkpoint, if any.
    pub async fn latest(dir: &DataDir) -> Result<Option<Manifest>> {
        match Manifest::list(dir).await?.last() {
            Some(interval) => Manifest::load(dir, *interval).await,
            None => Ok(None),
        }
    }
}

/// Deletes all but the newest `keep` committed checkpoints, and the files of
/// checkpoints older than the newest that never committed. Returns the intervals
/// whose checkpoints were deleted.
pub async fn collect_garbage(dir: &DataDir, keep: usize) -> Result<Vec<IntervalId>> {
    let committed = Manifest::list(dir).await?;
    let Some(&newest) = committed.last() else {
        return Ok(Vec::new());
    };
    let keep_from = committed.len().saturating_sub(keep.max(1));
    let kept: Vec<IntervalId> = committed[keep_from..].to_vec();
    let mut written: Vec<IntervalId> = dir
        .list(CHECKPOINTS)
        .await?
        .iter()
        .filter_map(|l| {
            l.path
                .strip_prefix(&format!("{CHECKPOINTS}/"))?
                .split('/')
                .next()?
                .parse()
                .ok()
                .map(IntervalId)
        })
        .collect();
    written.extend(committed.iter().copied());
    written.sort();
    written.dedup();
    let mut deleted = Vec::new();
    for interval in written {
        // Newer than the newest manifest: possibly a checkpoint still being written.
        if kept.contains(&interval) || interval > newest {
            continue;
        }
        // The manifest goes first: a checkpoint without one is no longer used, even if
        // deleting its files stops half-way.
        dir.delete(&manifest_path(interval)).await?;
        dir.delete_prefix(&checkpoint_dir(interval)).await?;
        deleted.push(interval);
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::Int64Array;
    use arrow::datatypes::{DataType, Field, Schema};

    use super::*;
    use crate::data_dir::StoreConfig;

    fn memory(name: &str) -> Result<DataDir> {
        DataDir::open(&StoreConfig {
            url: format!("memory://{name}"),
            ..Default::default()
        })
    }

    fn batch(values: Vec<i64>) -> Result<RecordBatch> {
        let schema = Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, false)]));
        Ok(RecordBatch::try_new(
            schema,
            vec![Arc::new(Int64Array::from(values))],
        )?)
    }

    fn manifest(interval: u64, files: Vec<CheckpointFile>) -> Manifest {
        Manifest {
            version: FORMAT_VERSION,
            interval,
            origin_nanos: 0,
            width_nanos: 1_000_000_000,
            created_at: "2026-01-01T00:00:00Z".into(),
            views: BTreeMap::from([(
                "v".to_string(),
                ViewCheckpoint {
                    sql: "CREATE MATERIALIZED VIEW v AS SELECT 1".into(),
                    partitions: vec![PartitionCheckpoint {
                        partition: 0,
                        files,
                        ..Default::default()
                    }],
                },
            )]),
            sources: BTreeMap::new(),
        }
    }

    #[tokio::test]
    async fn a_partition_record_is_read_back_only_where_it_was_written() -> Result<()> {
        let dir = memory("records")?;
        let file = write_part(&dir, IntervalId(5), "v", 3, "rows", &[batch(vec![1, 2])?])
            .await?
            .ok_or_else(|| Error::Corrupt {
                what: "part".into(),
                reason: "not written".into(),
            })?;
        let record = WrittenPartition {
            sql: "CREATE MATERIALIZED VIEW v AS SELECT 1".into(),
            partition: PartitionCheckpoint {
                partition: 3,
                files: vec![file],
                watermark: Some(7),
                ..Default::default()
            },
        };
        record.write(&dir, IntervalId(5), "v").await?;
        assert_eq!(
            WrittenPartition::read(&dir, IntervalId(5), "v", 3).await?,
            Some(record)
        );
        assert_eq!(
            WrittenPartition::read(&dir, IntervalId(5), "v", 2).await?,
            None
        );
        assert_eq!(
            WrittenPartition::read(&dir, IntervalId(4), "v", 3).await?,
            None
        );
        Ok(())
    }

    #[tokio::test]
    async fn parts_round_trip_and_damage_is_detected() -> Result<()> {
        let dir = memory("checkpoint-parts")?;
        let batches = vec![batch(vec![1, 2, 3])?, batch(vec![4])?];
        let file = write_part(&dir, IntervalId(7), "v", 2, "distinct-1", &batches)
            .await?
            .ok_or_else(|| Error::Corrupt {
                what: "test".into(),
                reason: "nothing written".into(),
            })?;
        assert_eq!(
            file.path,
            format!("{}/distinct-1.arrow", partition_dir(IntervalId(7), "v", 2))
        );
        assert_eq!(file.rows, 4);
        assert_eq!(read_part(&dir, &file).await?, batches);
        assert!(
            write_part(&dir, IntervalId(7), "v", 2, "rows", &[])
                .await?
                .is_none()
        );
        // A truncated file is refused with its path.
        let bytes = dir.get(&file.path).await?.unwrap_or_default();
        dir.put(&file.path, bytes.slice(..bytes.len() / 2)).await?;
        let err = read_part(&dir, &file).await.err().map(|e| e.to_string());
        assert!(
            err.as_deref().is_some_and(|e| e.contains(&file.path)),
            "{err:?}"
        );
        Ok(())
    }

    #[tokio::test]
    async fn a_manifest_commits_once_and_old_checkpoints_are_collected() -> Result<()> {
        let dir = memory("checkpoint-manifests")?;
        for interval in [10, 20, 30, 40] {
            let file = write_part(
                &dir,
                IntervalId(interval),
                "v",
                0,
                "rows",
                &[batch(vec![1])?],
            )
            .await?
            .into_iter()
            .collect();
            assert!(manifest(interval, file).commit(&dir).await?);
        }
        // A second commit of the same interval does not replace the first.
        assert!(!manifest(40, vec![]).commit(&dir).await?);
        assert_eq!(
            Manifest::load(&dir, IntervalId(40))
                .await?
                .map(|m| m.files().count()),
            Some(1)
        );
        // Files of a checkpoint that never committed: older ones are leftovers, newer
        // ones may still be being written.
        write_part(&dir, IntervalId(35), "v", 0, "rows", &[batch(vec![1])?]).await?;
        write_part(&dir, IntervalId(50), "v", 0, "rows", &[batch(vec![1])?]).await?;
        let deleted = collect_garbage(&dir, 2).await?;
        assert_eq!(
            deleted,
            vec![IntervalId(10), IntervalId(20), IntervalId(35)]
        );
        assert_eq!(
            Manifest::list(&dir).await?,
            vec![IntervalId(30), IntervalId(40)]
        );
        assert!(dir.list(&checkpoint_dir(IntervalId(10))).await?.is_empty());
        assert!(!dir.list(&checkpoint_dir(IntervalId(50))).await?.is_empty());
        assert_eq!(Manifest::latest(&dir).await?.map(|m| m.interval), Some(40));
        Ok(())
    }

    #[tokio::test]
    async fn unknown_format_versions_are_refused() -> Result<()> {
        let dir = memory("checkpoint-versions")?;
        dir.put(
            &manifest_path(IntervalId(3)),
            Bytes::from_static(b"{\"version\": 99}"),
        )
        .await?;
        let err = Manifest::latest(&dir).await.err().map(|e| e.to_string());
        assert!(
            err.as_deref()
                .is_some_and(|e| e.contains("version 99 is not supported")),
            "{err:?}"
        );
        Ok(())
    }
}
