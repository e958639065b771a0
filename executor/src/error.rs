//! Errors of the executor.

use datafusion::error::DataFusionError;

/// Everything that can go wrong while ingesting records or running tasks.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A source's configuration is wrong (unknown connector, bad option value, ...).
    #[error("{0}")]
    Config(String),
    /// A source failed and stopped (e.g. a malformed record under `on_error = 'fail'`).
    #[error("source \"{source_name}\" failed: {reason}")]
    SourceFailed { source_name: String, reason: String },
    /// A task failed inside DataFusion.
    #[error("{0}")]
    DataFusion(#[from] DataFusionError),
    /// An Arrow kernel failed.
    #[error("arrow: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
    #[error(transparent)]
    Planner(#[from] dstream_planner::Error),
    #[error(transparent)]
    Storage(#[from] dstream_storage::Error),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// A bug in dstream.
    #[error("internal error: {0}")]
    Internal(String),
}

/// Result with the executor [`Error`] as default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Shorthand for an [`Error::Config`].
pub fn config_error(msg: impl Into<String>) -> Error {
    Error::Config(msg.into())
}
