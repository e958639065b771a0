//! dstream-executor: runs stream plans interval by interval.
//!
//! The entry point is [`worker::run`], a worker process: it runs the receivers of
//! sources ([`SourceRuntime`] seals each interval's records into [`Block`]s) and the
//! map and reduce tasks of views' stage DAGs, deterministic DataFusion tasks over
//! immutable inputs.
//!
//! # Layout
//! - [`connector`]: receivers of source records (the `generator`, ...).
//! - [`ingest`]: [`SourceRuntime`], sealing intervals into blocks, watermarks.
//! - [`block`]: [`Block`], one source's rows of one interval.
//! - [`operator`]: the [`operator::StreamOperator`] trait and its operators.
//! - [`rpc`]: the wire contract between coordinator and workers: messages, codecs,
//!   the typed [`rpc::WorkerClient`].
//! - [`shuffle`]: hash partitioning between stages.
//! - [`table`]: tables over files, and `CREATE TABLE` options.
//! - [`task`]: running a DataFusion plan over in-memory batches.
//! - [`view_runtime`]: a view's operator, output shape and window watermark.
//! - [`worker`]: the worker process: its gRPC control plane and Flight data plane.
//! - [`error`]: the crate's [`Error`] and [`Result`].

// Nothing a client, a record or the network sends may reach a panic: outside tests
// (where failing loudly is the point) `expect`, `panic!`, slice indexing and unchecked
// arithmetic are refused, as `unwrap` is for the whole workspace.
#![cfg_attr(
    not(test),
    warn(
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing,
        clippy::arithmetic_side_effects
    )
)]

pub mod block;
pub mod connector;
pub mod error;
pub mod ingest;
pub mod operator;
pub mod rpc;
pub mod shuffle;
pub mod table;
pub mod task;
pub mod view_runtime;
pub mod worker;

pub use block::Block;
pub use error::{Error, Result};
pub use ingest::{SourceRuntime, SourceStats};
pub use operator::Changelog;
