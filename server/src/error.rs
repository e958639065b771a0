//! Errors of the server, and their mapping to SQLSTATE codes at the front doors.

use datafusion::error::DataFusionError;

/// Everything a statement or the server can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}", planner_message(.0))]
    Planner(#[from] dstream_planner::Error),
    #[error("{}", executor_message(.0))]
    Executor(#[from] dstream_executor::Error),
    #[error(transparent)]
    Storage(#[from] dstream_storage::Error),
    #[error("{}", datafusion_message(.0))]
    DataFusion(#[from] DataFusionError),
    /// A statement that is valid SQL but not allowed now, with the reason.
    #[error("{0}")]
    Invalid(String),
    /// A definition (columns, options, watermark) that cannot work, with the reason.
    #[error("{0}")]
    InvalidDefinition(String),
    /// An unknown name.
    #[error("{kind} \"{name}\" does not exist")]
    UnknownObject { kind: &'static str, name: String },
    /// A statement dstream does not support.
    #[error("not supported: {0}")]
    Unsupported(String),
    /// A configuration problem at startup.
    #[error("configuration: {0}")]
    Config(String),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The statement ran longer than `statement_timeout` and was cancelled.
    #[error("canceling statement due to statement timeout ({0})")]
    StatementTimeout(String),
    /// An ad-hoc query needed more memory, or returned a bigger result, than a query
    /// may (`query_memory`, `max_result_bytes`).
    #[error("out of memory: {0}")]
    OutOfMemory(String),
    /// A worker this statement needs is dead or gone.
    #[error("{0}")]
    WorkerLost(String),
    /// A bug in dstream.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// The error a worker answered with: its option and definition errors stay user
    /// errors, anything else is the worker's failure.
    pub fn from_status(status: &tonic::Status) -> Error {
        let message = status.message().to_string();
        match status.code() {
            tonic::Code::InvalidArgument => {
                Error::Executor(dstream_executor::Error::Config(message))
            }
            _ => Error::Executor(dstream_executor::Error::Remote(message)),
        }
    }
}

/// Result with the server [`Error`] as default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The SQLSTATE a client receives for this error.
    pub fn sqlstate(&self) -> &'static str {
        use dstream_executor::Error as X;
        use dstream_planner::Error as P;
        match self {
            Error::Planner(e) => match e {
                P::Syntax(_) => "42601",
                P::UnknownObject { .. } => "42P01",
                P::DuplicateObject { .. } => "42P07",
                P::Unsupported(_) => "0A000",
                P::Invalid(_) => "22023",
                P::InvalidDefinition(_) => "42P16",
                P::TooComplex(_) => "54001",
                P::LimitExceeded(_) => "54000",
                P::DataFusion(e) => datafusion_sqlstate(e),
                P::Internal(_) => "XX000",
            },
            Error::Executor(e) => match e {
                X::Config(_) => "22023",
                X::SourceFailed { .. } => "58000",
                X::DataFusion(e) => datafusion_sqlstate(e),
                X::Arrow(_) => "22000",
                X::BadRecords(_) => "22P02",
                X::Planner(_) | X::Storage(_) | X::Io(_) => "58000",
                X::Remote(_) => "58000",
                // serialization_failure: Postgres clients know to retry it.
                X::Moved(_) => "40001",
                X::Internal(_) => "XX000",
            },
            Error::Storage(_) | Error::Io(_) => "58030",
            Error::DataFusion(e) => datafusion_sqlstate(e),
            Error::Invalid(_) => "55000",
            Error::InvalidDefinition(_) => "42P16",
            Error::UnknownObject { .. } => "42P01",
            Error::Unsupported(_) => "0A000",
            Error::Config(_) => "22023",
            Error::StatementTimeout(_) => "57014",
            Error::OutOfMemory(_) => "53200",
            Error::WorkerLost(_) => "58000",
            Error::Internal(_) => "XX000",
        }
    }
}

fn datafusion_sqlstate(e: &DataFusionError) -> &'static str {
    match e.find_root() {
        DataFusionError::SQL(_, _) => "42601",
        DataFusionError::SchemaError(inner, _) => match inner.as_ref() {
            datafusion::common::SchemaError::FieldNotFound { .. } => "42703",
            datafusion::common::SchemaError::AmbiguousReference { .. } => "42702",
            _ => "42000",
        },
        DataFusionError::Plan(msg) => {
            if msg.contains("table") && msg.contains("not found") {
                "42P01"
            } else if msg.contains("No function matches")
                || msg.contains("Invalid function")
                || msg.contains("not found")
            {
                "42883"
            } else {
                "42000"
            }
        }
        DataFusionError::NotImplemented(_) => "0A000",
        DataFusionError::ArrowError(_, _) | DataFusionError::Execution(_) => "22000",
        DataFusionError::ResourcesExhausted(_) => "53200",
        DataFusionError::External(_) if crate::cluster::remote_table::read_moved(e) => "40001",
        _ => "XX000",
    }
}

pub use dstream_executor::error::{datafusion_message, executor_message, planner_message};
