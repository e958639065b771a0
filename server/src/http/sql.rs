//! `POST /v1/sql`: runs the statements of a request, in order, as the Postgres wire
//! protocol would, and answers with their results.
//!
//! The body is the SQL text (`text/plain`, `application/sql`, no content type, or
//! what `curl -d` labels a form), or a JSON [`SqlRequest`] (`application/json`). `Accept` chooses the answer:
//!
//! - `application/json` (the default): a [`SqlResponse`], one outcome per statement;
//! - `text/csv`: the rows of the last statement that returns rows, with a header;
//! - `application/vnd.apache.arrow.stream`: the same rows as an Arrow IPC stream.
//!
//! Results are encoded batch by batch as the body is sent, never as one buffer.

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::HttpError;
use crate::engine::Engine;
use crate::session::{self, StatementResult};

/// The media type of an Arrow IPC stream.
pub const ARROW_STREAM: &str = "application/vnd.apache.arrow.stream";

/// A request as JSON.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SqlRequest {
    /// One or more statements, separated by `;`.
    pub sql: String,
}

/// The answer as JSON: one outcome per statement, in order.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SqlResponse {
    pub results: Vec<StatementOutcome>,
}

/// What one statement did.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct StatementOutcome {
    /// `rows` for a statement that returns rows (queries, SHOW, DESCRIBE, EXPLAIN),
    /// `command` for the others.
    pub kind: String,
    /// A command's tag, e.g. `CREATE SOURCE`, `INSERT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// For `INSERT`: how many rows it added.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affected: Option<u64>,
    /// The columns of the rows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub columns: Option<Vec<Column>>,
    /// The rows, each an object keyed by column name. Timestamps are strings; NULLs
    /// are `null`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<Object>>)]
    pub rows: Option<Vec<serde_json::Value>>,
}

pub use crate::status::Column;

/// The answer formats, by `Accept`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    Json,
    Csv,
    Arrow,
}

/// The first format `accept` lists that the API has (JSON without `Accept`).
fn format_of(headers: &HeaderMap) -> Result<Format, HttpError> {
    let Some(accept) = headers.get(header::ACCEPT) else {
        return Ok(Format::Json);
    };
    let accept = accept.to_str().unwrap_or_default();
    for media in accept.split(',') {
        let media = media.split(';').next().unwrap_or_default().trim();
        match media.to_ascii_lowercase().as_str() {
            "application/json" | "application/*" | "*/*" | "" => return Ok(Format::Json),
            "text/csv" | "text/*" => return Ok(Format::Csv),
            ARROW_STREAM => return Ok(Format::Arrow),
            _ => {}
        }
    }
    Err(HttpError::request(
        StatusCode::NOT_ACCEPTABLE,
        "not_acceptable",
        format!(
            "cannot answer as {accept:?}: ask for application/json, text/csv or {ARROW_STREAM}"
        ),
    ))
}

/// The SQL of a request body.
fn sql_of(headers: &HeaderMap, body: Result<Bytes, BytesRejection>) -> Result<String, HttpError> {
    let body = body.map_err(|e| {
        let status = e.status();
        let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "payload_too_large"
        } else {
            "bad_request"
        };
        HttpError::request(status, code, e.body_text())
    })?;
    let content_type = super::content_type(headers);
    let text = || {
        String::from_utf8(body.to_vec()).map_err(|_| {
            HttpError::request(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "the SQL is not UTF-8",
            )
        })
    };
    match content_type.as_deref() {
        // `curl -d` sends the text as it is, labelled as a form.
        None
        | Some("text/plain")
        | Some("application/sql")
        | Some("application/x-www-form-urlencoded") => text(),
        Some("application/json") => serde_json::from_slice::<SqlRequest>(&body)
            .map(|r| r.sql)
            .map_err(|e| {
                HttpError::request(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    format!("the body is not a JSON object with a \"sql\" string: {e}"),
                )
            }),
        Some(other) => Err(HttpError::request(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!("a body of {other} cannot hold SQL: send text/plain or application/json"),
        )),
    }
}

/// Runs statements and answers with their results.
#[utoipa::path(
    post,
    path = "/v1/sql",
    request_body(
        description = "The statements, as text (`text/plain`), or as a JSON `SqlRequest` (`application/json`)",
        content(
            (String = "text/plain", example = json!("SELECT * FROM counts ORDER BY n DESC LIMIT 10")),
            (SqlRequest = "application/json"),
        ),
    ),
    responses(
        (status = 200, description = "Every statement ran. The answer is in the format `Accept` asked for: JSON, one outcome per statement; CSV, the rows of the last statement that returns rows, with a header; or those rows as an Arrow IPC stream",
            content(
                (SqlResponse = "application/json"),
                (String = "text/csv"),
                (Vec<u8> = "application/vnd.apache.arrow.stream"),
            )),
        (status = 400, description = "Bad SQL, an unsupported statement, or a bad request", body = super::error::ApiError),
        (status = 404, description = "An unknown source, table or view", body = super::error::ApiError),
        (status = 406, description = "No format `Accept` allows", body = super::error::ApiError),
        (status = 409, description = "A name that exists, or an object in use", body = super::error::ApiError),
        (status = 413, description = "A body over the limit", body = super::error::ApiError),
        (status = 415, description = "A body neither text nor JSON", body = super::error::ApiError),
        (status = 500, description = "An internal error", body = super::error::ApiError),
        (status = 503, description = "A worker or the store failed; try again", body = super::error::ApiError),
        (status = 504, description = "The statement ran longer than statement_timeout", body = super::error::ApiError),
    )
)]
pub async fn sql(
    State(engine): State<Engine>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, HttpError> {
    let format = format_of(&headers)?;
    let sql = sql_of(&headers, body)?;
    let results = session::execute(&engine, &sql).await?;
    let mut outcomes = Vec::with_capacity(results.len());
    for result in results {
        outcomes.push(match result {
            StatementResult::Rows { schema, batches } => Outcome::Rows(schema, batches),
            StatementResult::Command { tag, rows } => Outcome::Command(tag, rows),
            StatementResult::Subscribe(_) => {
                return Err(HttpError::request(
                    StatusCode::BAD_REQUEST,
                    "feature_not_supported",
                    "SUBSCRIBE streams over the Postgres wire protocol (psql, dstream sql); \
                     POST /v1/sql answers once",
                ));
            }
        });
    }
    match format {
        Format::Json => Ok(json_answer(outcomes)),
        Format::Csv | Format::Arrow => {
            let Some((schema, batches)) = outcomes.into_iter().rev().find_map(|o| match o {
                Outcome::Rows(schema, batches) => Some((schema, batches)),
                Outcome::Command(..) => None,
            }) else {
                return Err(HttpError::request(
                    StatusCode::NOT_ACCEPTABLE,
                    "not_acceptable",
                    "no statement of the request returns rows: ask for application/json",
                ));
            };
            if format == Format::Csv {
                Ok(csv_answer(schema, batches))
            } else {
                arrow_answer(schema, batches)
            }
        }
    }
}

/// One statement's result, as the answer encodes it.
enum Outcome {
    Rows(SchemaRef, Vec<RecordBatch>),
    Command(String, Option<u64>),
}

/// A body of `chunks`, each encoded when the body gets to it.
fn streamed(
    content_type: &'static str,
    chunks: impl Iterator<Item = Chunk> + Send + 'static,
) -> Response {
    let body = Body::from_stream(futures::stream::iter(chunks));
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

fn io_error(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

/// One encoded piece of an answer, or why it could not be encoded.
type Chunk = Result<Vec<u8>, std::io::Error>;

fn json_answer(outcomes: Vec<Outcome>) -> Response {
    let count = outcomes.len();
    let chunks = outcomes.into_iter().enumerate().flat_map(
        move |(i, outcome)| -> Box<dyn Iterator<Item = Chunk> + Send> {
            let separator = if i.saturating_add(1) < count { "," } else { "" };
            match outcome {
                Outcome::Command(tag, affected) => {
                    let outcome = StatementOutcome {
                        kind: "command".into(),
                        tag: Some(tag),
                        affected,
                        columns: None,
                        rows: None,
                    };
                    Box::new(
                        [
                            serde_json::to_vec(&outcome).map_err(io_error),
                            Ok(separator.into()),
                        ]
                        .into_iter(),
                    )
                }
                Outcome::Rows(schema, batches) => {
                    Box::new(json_rows_outcome(&schema, batches, separator))
                }
            }
        },
    );
    let chunks = std::iter::once(Ok(br#"{"results":["#.to_vec()))
        .chain(chunks)
        .chain(std::iter::once(Ok(b"]}".to_vec())));
    streamed("application/json", chunks)
}

/// A `rows` outcome: its columns, then its rows batch by batch, each encoded only
/// when the body gets to it.
fn json_rows_outcome(
    schema: &SchemaRef,
    batches: Vec<RecordBatch>,
    separator: &'static str,
) -> impl Iterator<Item = Chunk> + Send + use<> {
    let columns = crate::status::columns_of(schema);
    let head = serde_json::to_vec(&columns)
        .map(|columns| {
            let mut head = br#"{"kind":"rows","columns":"#.to_vec();
            head.extend(columns);
            head.extend(br#","rows":["#);
            head
        })
        .map_err(io_error);
    let rows = batches
        .into_iter()
        .filter(|b| b.num_rows() > 0)
        .enumerate()
        .map(|(i, batch)| {
            json_rows(&batch).map(|rows| {
                let mut out = if i == 0 { Vec::new() } else { b",".to_vec() };
                out.extend(rows);
                out
            })
        });
    std::iter::once(head)
        .chain(rows)
        .chain(std::iter::once(Ok(format!("]}}{separator}").into_bytes())))
}

/// The rows of `batch` as JSON objects, comma-separated.
pub(super) fn json_rows(batch: &RecordBatch) -> Result<Vec<u8>, std::io::Error> {
    let mut writer = arrow::json::WriterBuilder::new()
        .with_explicit_nulls(true)
        .build::<_, arrow::json::writer::LineDelimited>(Vec::new());
    writer.write(batch).map_err(io_error)?;
    writer.finish().map_err(io_error)?;
    let mut lines = writer.into_inner();
    // One object per line; a newline never stands inside a JSON value.
    if lines.last() == Some(&b'\n') {
        lines.pop();
    }
    for byte in lines.iter_mut() {
        if *byte == b'\n' {
            *byte = b',';
        }
    }
    Ok(lines)
}

fn csv_answer(schema: SchemaRef, batches: Vec<RecordBatch>) -> Response {
    let header_only = RecordBatch::new_empty(schema);
    let batches =
        std::iter::once(header_only).chain(batches.into_iter().filter(|b| b.num_rows() > 0));
    let chunks = batches.enumerate().map(|(i, batch)| {
        let mut writer = arrow::csv::WriterBuilder::new()
            .with_header(i == 0)
            .build(Vec::new());
        writer.write(&batch).map_err(io_error)?;
        Ok(writer.into_inner())
    });
    streamed("text/csv; charset=utf-8", chunks)
}

fn arrow_answer(schema: SchemaRef, batches: Vec<RecordBatch>) -> Result<Response, HttpError> {
    let mut writer = arrow::ipc::writer::StreamWriter::try_new(Vec::new(), &schema)
        .map_err(|e| HttpError::from(crate::error::Error::Internal(e.to_string())))?;
    let head = std::mem::take(writer.get_mut());
    let mut batches = batches.into_iter();
    let mut writer = Some(writer);
    let rest = std::iter::from_fn(move || {
        let w = writer.as_mut()?;
        let written = match batches.next() {
            Some(batch) => w.write(&batch),
            None => {
                let finished = w.finish();
                let tail = finished.map(|()| std::mem::take(w.get_mut()));
                writer = None;
                return Some(tail.map_err(io_error));
            }
        };
        Some(
            written
                .map(|()| std::mem::take(w.get_mut()))
                .map_err(io_error),
        )
    });
    Ok(streamed(
        ARROW_STREAM,
        std::iter::once(Ok(head)).chain(rest),
    ))
}
