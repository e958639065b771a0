//! What the API allows a request: the size and time of its body, and the time to
//! send its headers. A request over a limit gets a 4xx [`super::error::ApiError`];
//! a slow client never holds a connection or a task for longer than the limit.

use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::HttpError;

/// The largest request body the API reads; a bigger one is refused with 413 before it
/// is read whole. Statements are further bounded by `max_statement_bytes`.
pub const MAX_REQUEST_BYTES: usize = 16 << 20;

/// Reads the body of `request` whole, within `timeout` (`http_request_timeout`) and
/// [`MAX_REQUEST_BYTES`], before the handler runs. (A connection that takes longer
/// than `timeout` to send a request's headers is closed by [`super::serve`].)
pub async fn read_body(State(timeout): State<Duration>, request: Request, next: Next) -> Response {
    let (parts, body) = request.into_parts();
    let limited = http_body_util::Limited::new(body, MAX_REQUEST_BYTES);
    let read = http_body_util::BodyExt::collect(limited);
    let body = match tokio::time::timeout(timeout, read).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            return HttpError::request(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("the request body is over {MAX_REQUEST_BYTES} bytes"),
            )
            .into_response();
        }
        Ok(Err(e)) => {
            return HttpError::request(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("could not read the request body: {e}"),
            )
            .into_response();
        }
        Err(_) => {
            return HttpError::request(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                format!(
                    "the request body did not arrive within {timeout:?} (http_request_timeout)"
                ),
            )
            .into_response();
        }
    };
    next.run(Request::from_parts(parts, Body::from(body))).await
}
