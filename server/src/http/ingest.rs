//! `POST /v1/sources/{name}`: records pushed to a source created `WITH (connector =
//! 'http')`, as newline-delimited JSON, CSV or an Arrow IPC stream.
//!
//! A body is decoded whole before anything of it is taken; once the answer is 200, its
//! records are in the source's inbox ([`crate::state::Inbox`]) and will be in the next
//! interval sealed — a worker lost before the seal is recorded loses none of them.
//! While the source holds its bound of records not yet sealed, bodies are refused
//! with 429 and a `Retry-After` of one interval.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use dstream_executor::connector::push::{BodyFormat, decode_body};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{ApiError, HttpError};
use crate::engine::Engine;
use crate::error::Error;
use crate::state::inbox::Offer;

/// What a push did.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct IngestResponse {
    /// Records taken: they will be in the next interval sealed.
    pub accepted: u64,
    /// Malformed lines dropped (under the source's `on_error = 'skip'`).
    pub malformed: u64,
    /// Rows and bytes the source now holds accepted but not yet sealed.
    pub pending_rows: u64,
    pub pending_bytes: u64,
}

/// Pushes records to a source.
#[utoipa::path(
    post,
    path = "/v1/sources/{name}",
    params(("name" = String, Path, description = "The source's name; it must be created WITH (connector = 'http')")),
    request_body(
        description = "Records: newline-delimited JSON objects (`application/x-ndjson`, `application/json`, or no type), CSV lines without a header in the declared column order (`text/csv`), or an Arrow IPC stream with the source's columns by name (`application/vnd.apache.arrow.stream`)",
        content(
            (String = "application/x-ndjson", example = json!("{\"user_id\": 1, \"url\": \"/a\"}\n{\"user_id\": 2, \"url\": \"/b\"}")),
            (String = "text/csv"),
            (Vec<u8> = "application/vnd.apache.arrow.stream"),
        ),
    ),
    responses(
        (status = 200, description = "The records were taken", body = IngestResponse),
        (status = 400, description = "A malformed body (under `on_error = 'fail'`, one malformed line refuses it whole), or an Arrow stream whose columns do not fit", body = ApiError),
        (status = 404, description = "No such source", body = ApiError),
        (status = 409, description = "The source does not take pushed records, or it failed", body = ApiError),
        (status = 413, description = "A body over the limit", body = ApiError),
        (status = 415, description = "A body in no format the source takes", body = ApiError),
        (status = 429, description = "The source holds its bound of records not yet sealed (`max_pending_rows`, `max_pending_bytes`); try again after `Retry-After` seconds. Nothing of the body was taken", body = ApiError,
            headers(("Retry-After" = u64, description = "Seconds to wait: one interval"))),
    )
)]
pub async fn ingest(
    State(engine): State<Engine>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, HttpError> {
    let snapshot = engine.snapshot();
    let Some(source) = snapshot.status.sources.iter().find(|s| s.name == name) else {
        return Err(HttpError::from(Error::UnknownObject {
            kind: "source",
            name,
        }));
    };
    let Some(inbox) = snapshot.inboxes.get(&name).cloned() else {
        return Err(HttpError::request(
            StatusCode::CONFLICT,
            "not_pushable",
            format!(
                "source {name} reads its records itself (connector = '{}'); only a source \
                 created WITH (connector = 'http') takes records over HTTP",
                source.connector
            ),
        ));
    };
    if let Some(error) = &source.error {
        return Err(HttpError::request(
            StatusCode::CONFLICT,
            "source_failed",
            format!("source {name} failed and stopped: {error}; drop it and create it again"),
        ));
    }
    let media = super::content_type(&headers);
    let Some(format) = BodyFormat::of_media_type(media.as_deref()) else {
        return Err(HttpError::request(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!(
                "a source takes application/x-ndjson, text/csv or \
                 application/vnd.apache.arrow.stream, not {}",
                media.unwrap_or_default()
            ),
        ));
    };
    let retry_after = (snapshot.interval_nanos as u64)
        .div_ceil(1_000_000_000)
        .max(1);
    if inbox.is_full() {
        return Ok(too_many(&name, retry_after, inbox.held_size()));
    }
    let body = body.map_err(|e| HttpError::request(e.status(), "bad_request", e.body_text()))?;
    // A few bodies of a source are decoded at once; the bound is checked again after
    // waiting for a turn.
    let _turn = inbox
        .decoding
        .acquire()
        .await
        .map_err(|e| HttpError::from(Error::Internal(e.to_string())))?;
    if inbox.is_full() {
        return Ok(too_many(&name, retry_after, inbox.held_size()));
    }
    // Decoding takes CPU: off the runtime that serves requests.
    let decoding = inbox.clone();
    let decoded = engine
        .inner
        .queries
        .run(async move {
            decode_body(
                &decoding.def.name,
                &decoding.def.record_schema,
                &decoding.options,
                format,
                &body,
            )
        })
        .await
        .map_err(|e| HttpError::from(Error::Internal(e.to_string())))?
        .map_err(|e| match e {
            dstream_executor::Error::BadRecords(message) => {
                HttpError::request(StatusCode::BAD_REQUEST, "malformed_records", message)
            }
            other => HttpError::from(Error::Internal(other.to_string())),
        })?;
    let (accepted, malformed) = (decoded.rows(), decoded.malformed);
    match inbox.offer(decoded) {
        Offer::Taken {
            held_rows,
            held_bytes,
        } => Ok(Json(IngestResponse {
            accepted,
            malformed,
            pending_rows: held_rows,
            pending_bytes: held_bytes,
        })
        .into_response()),
        Offer::Full {
            held_rows,
            held_bytes,
        } => Ok(too_many(&name, retry_after, (held_rows, held_bytes))),
    }
}

/// The 429 of a source that holds its bound.
fn too_many(source: &str, retry_after: u64, (rows, bytes): (u64, u64)) -> Response {
    let error = HttpError::request(
        StatusCode::TOO_MANY_REQUESTS,
        "source_behind",
        format!(
            "source {source} holds {rows} rows ({bytes} bytes) not yet sealed, its bound \
             (max_pending_rows, max_pending_bytes); nothing of this body was taken: try \
             again in {retry_after} s"
        ),
    );
    let mut response = error.into_response();
    if let Ok(value) = header::HeaderValue::from_str(&retry_after.to_string()) {
        response.headers_mut().insert(header::RETRY_AFTER, value);
    }
    response
}
