//! Errors of the storage layer.

/// Everything that can go wrong while reading or writing durable data.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The object store refused or failed an operation.
    #[error("object store: {0}")]
    ObjectStore(#[from] object_store::Error),
    /// An object store operation failed: what was being done, and why.
    #[error("{what}: {source}")]
    Store {
        what: String,
        #[source]
        source: object_store::Error,
    },
    /// A stored file could not be decoded.
    #[error("corrupt {what}: {reason}")]
    Corrupt { what: String, reason: String },
    /// An Arrow encoding or decoding error.
    #[error("arrow: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
    /// A data directory that cannot be used, with the reason.
    #[error("data directory {path}: {reason}")]
    DataDir { path: String, reason: String },
}

/// Result with the storage [`Error`] as default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
