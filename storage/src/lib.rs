//! dstream-storage: the lowest layer of dstream.
//!
//! It names things (intervals, partitions), wraps the object store that holds durable
//! data, and persists the catalog. Everything above it — planner, executor, server —
//! builds on these types. The entry type is [`DataDir`], the durable home of one
//! dstream deployment.
//!
//! # Layout
//! - [`ids`]: [`IntervalId`], [`PartitionId`] and the interval timeline.
//! - [`data_dir`]: [`DataDir`], the object-store backed data directory (`file://`,
//!   `s3://`, `memory://`).
//! - [`catalog_file`]: [`CatalogFile`], the persisted list of catalog entries.
//! - [`checkpoint`]: checkpoint files and the [`checkpoint::Manifest`] that commits them.
//! - [`table_data`]: rows of user tables as Arrow IPC files.
//! - [`error`]: the crate's [`Error`] and [`Result`].

pub mod catalog_file;
pub mod checkpoint;
pub mod data_dir;
pub mod error;
pub mod fault_store;
pub mod ids;
pub mod table_data;

pub use catalog_file::{CatalogEntry, CatalogFile, CatalogState, EntryKind};
pub use data_dir::{DataDir, Listed, S3Options, StoreConfig};
pub use error::{Error, Result};
pub use ids::{IntervalId, PartitionId, Timeline};
