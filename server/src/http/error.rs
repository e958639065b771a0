//! [`ApiError`]: what every failed request gets — a JSON body with a stable code, the
//! SQLSTATE where the error has one, and a message — under the HTTP status that
//! matches it.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::Error;

/// The body of every error response.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ApiError {
    pub error: ErrorDetail,
}

/// What went wrong.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// A stable, machine-readable code, e.g. `syntax_error`, `undefined_object`,
    /// `payload_too_large`.
    pub code: String,
    /// The SQLSTATE of a statement's error, as the Postgres wire protocol reports it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sqlstate: Option<String>,
    pub message: String,
    /// The HTTP status, repeated for clients that only keep the body.
    pub status: u16,
}

/// An error response in the making.
#[derive(Debug)]
pub struct HttpError {
    pub status: StatusCode,
    pub code: &'static str,
    pub sqlstate: Option<&'static str>,
    pub message: String,
}

impl HttpError {
    /// An error of the request itself (not of a statement).
    pub fn request(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        HttpError {
            status,
            code,
            sqlstate: None,
            message: message.into(),
        }
    }
}

impl From<Error> for HttpError {
    /// A statement's error: its SQLSTATE chooses the code and the status.
    fn from(e: Error) -> Self {
        let sqlstate = e.sqlstate();
        let (status, code) = status_of(sqlstate);
        HttpError {
            status,
            code,
            sqlstate: Some(sqlstate),
            message: e.to_string(),
        }
    }
}

/// The HTTP status and the stable code of a SQLSTATE.
pub fn status_of(sqlstate: &str) -> (StatusCode, &'static str) {
    match sqlstate {
        "42601" => (StatusCode::BAD_REQUEST, "syntax_error"),
        "42P01" => (StatusCode::NOT_FOUND, "undefined_object"),
        "42703" => (StatusCode::BAD_REQUEST, "undefined_column"),
        "42883" => (StatusCode::BAD_REQUEST, "undefined_function"),
        "42P07" => (StatusCode::CONFLICT, "duplicate_object"),
        "0A000" => (StatusCode::BAD_REQUEST, "feature_not_supported"),
        "42P16" => (StatusCode::BAD_REQUEST, "invalid_definition"),
        "55000" => (StatusCode::CONFLICT, "object_not_in_prerequisite_state"),
        "54000" | "54001" => (StatusCode::BAD_REQUEST, "statement_too_complex"),
        "57014" => (StatusCode::GATEWAY_TIMEOUT, "statement_timeout"),
        "53200" => (StatusCode::INSUFFICIENT_STORAGE, "out_of_memory"),
        "40001" => (StatusCode::SERVICE_UNAVAILABLE, "retry"),
        "58000" | "58030" => (StatusCode::SERVICE_UNAVAILABLE, "system_error"),
        "XX000" => (StatusCode::INTERNAL_SERVER_ERROR, "internal_error"),
        s if s.starts_with("42") => (StatusCode::BAD_REQUEST, "invalid_statement"),
        s if s.starts_with("22") => (StatusCode::BAD_REQUEST, "invalid_value"),
        _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal_error"),
    }
}

impl From<HttpError> for ApiError {
    fn from(e: HttpError) -> Self {
        ApiError {
            error: ErrorDetail {
                code: e.code.to_string(),
                sqlstate: e.sqlstate.map(str::to_string),
                message: e.message,
                status: e.status.as_u16(),
            },
        }
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let status = self.status;
        (status, Json(ApiError::from(self))).into_response()
    }
}

/// Any path the API does not have.
pub async fn not_found(uri: axum::http::Uri) -> HttpError {
    HttpError::request(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no such endpoint: {uri} (see GET /v1/openapi.json)"),
    )
}

/// A path the API has, asked with a method it does not take.
pub async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> HttpError {
    HttpError::request(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{uri} does not take {method} (see GET /v1/openapi.json)"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statement_errors_keep_their_sqlstate_under_a_matching_status() {
        assert_eq!(
            status_of("42601"),
            (StatusCode::BAD_REQUEST, "syntax_error")
        );
        assert_eq!(status_of("42P01").0, StatusCode::NOT_FOUND);
        assert_eq!(status_of("42P07").0, StatusCode::CONFLICT);
        assert_eq!(
            status_of("42999"),
            (StatusCode::BAD_REQUEST, "invalid_statement")
        );
        assert_eq!(status_of("XX000").0, StatusCode::INTERNAL_SERVER_ERROR);
        let e = HttpError::from(Error::Unsupported("joins of two streams".into()));
        assert_eq!(
            (e.status, e.code, e.sqlstate),
            (
                StatusCode::BAD_REQUEST,
                "feature_not_supported",
                Some("0A000")
            )
        );
    }
}
