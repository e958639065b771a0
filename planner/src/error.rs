//! Errors of the planner.
//!
//! User mistakes (bad SQL, unknown names, unsupported constructs) are kept apart from
//! internal errors so that the front doors can map each to a precise SQLSTATE.

use datafusion::error::DataFusionError;

/// Everything that can go wrong while parsing or planning a statement.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The statement text does not parse.
    #[error("syntax error: {0}")]
    Syntax(String),
    /// A name that does not exist in the catalog.
    #[error("{kind} \"{name}\" does not exist")]
    UnknownObject { kind: &'static str, name: String },
    /// A name that is already taken.
    #[error("{kind} \"{name}\" already exists")]
    DuplicateObject { kind: &'static str, name: String },
    /// A construct dstream does not support (yet), with what to do instead.
    #[error("not supported: {0}")]
    Unsupported(String),
    /// A statement that parses but is not valid, e.g. a window size that is not a
    /// multiple of the batch interval, or an option with a bad value.
    #[error("{0}")]
    Invalid(String),
    /// A definition (columns, options, watermark) that cannot work, with the reason.
    #[error("{0}")]
    InvalidDefinition(String),
    /// A statement too long or too deeply nested to parse and plan safely
    /// (see [`crate::limits`]).
    #[error("statement too complex: {0}")]
    TooComplex(String),
    /// A statement that asks for more than a configured limit allows, e.g. a window
    /// that puts every row in more windows than `max_windows_per_row`.
    #[error("limit exceeded: {0}")]
    LimitExceeded(String),
    /// An error raised by DataFusion while planning.
    #[error("{0}")]
    DataFusion(#[from] DataFusionError),
    /// A bug in dstream.
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<datafusion::sql::sqlparser::parser::ParserError> for Error {
    fn from(e: datafusion::sql::sqlparser::parser::ParserError) -> Self {
        use datafusion::sql::sqlparser::parser::ParserError;
        if matches!(e, ParserError::RecursionLimitExceeded) {
            return Error::TooComplex(
                "statement nests parentheses or subqueries too deeply to parse".into(),
            );
        }
        let msg = e.to_string();
        Error::Syntax(
            msg.strip_prefix("sql parser error: ")
                .unwrap_or(&msg)
                .to_string(),
        )
    }
}

/// Result with the planner [`Error`] as default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Shorthand for an [`Error::Invalid`].
pub fn invalid(msg: impl Into<String>) -> Error {
    Error::Invalid(msg.into())
}

/// Shorthand for an [`Error::Unsupported`].
pub fn unsupported(msg: impl Into<String>) -> Error {
    Error::Unsupported(msg.into())
}
