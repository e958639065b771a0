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
    /// Records pushed to a source that it cannot take (a malformed body).
    #[error("{0}")]
    BadRecords(String),
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
    /// Another process (a worker, the coordinator) failed a request or cannot be reached.
    #[error("{0}")]
    Remote(String),
    /// A worker no longer holds the rows a read asked for: the partition moved to
    /// another worker, or the version asked for expired. The same read of a newer
    /// snapshot finds them.
    #[error("{0}")]
    Moved(String),
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

/// A planner error in the words a SQL user expects.
pub fn planner_message(e: &dstream_planner::Error) -> String {
    match e {
        dstream_planner::Error::DataFusion(e) => datafusion_message(e),
        other => other.to_string(),
    }
}

/// An executor error in the words a SQL user expects.
pub fn executor_message(e: &Error) -> String {
    match e {
        Error::DataFusion(e) => datafusion_message(e),
        Error::Planner(e) => planner_message(e),
        other => other.to_string(),
    }
}

/// DataFusion's message, in the words a SQL user expects: no "Error during
/// planning:" prefixes, and missing tables named as PostgreSQL names them.
pub fn datafusion_message(e: &DataFusionError) -> String {
    let root = e.find_root();
    let text = match root {
        DataFusionError::Plan(msg) | DataFusionError::Execution(msg) => msg.clone(),
        DataFusionError::NotImplemented(msg) => format!("not supported: {msg}"),
        DataFusionError::SQL(e, _) => e.to_string(),
        DataFusionError::SchemaError(e, _) => e.to_string(),
        DataFusionError::ArrowError(e, _) => e.to_string(),
        DataFusionError::External(e) => e.to_string(),
        other => other.to_string(),
    };
    if let Some(rest) = text.strip_prefix("table '")
        && let Some(name) = rest.strip_suffix("' not found")
    {
        let short = name.rsplit('.').next().unwrap_or(name);
        return format!("relation \"{short}\" does not exist");
    }
    text.strip_prefix("sql parser error: ")
        .map(|t| format!("syntax error: {t}"))
        .unwrap_or(text)
}
