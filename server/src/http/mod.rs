//! The HTTP API: ad-hoc SQL over the committed state, and definitions, for clients
//! that speak HTTP rather than the Postgres wire protocol.
//!
//! [`serve`] runs the [`router`] on a listener until shutdown. Every route is in the
//! OpenAPI document the server serves at `GET /v1/openapi.json` ([`ApiDoc`]), derived
//! from the handlers and their types, so the document cannot drift from the code.
//!
//! - [`sql`]: `POST /v1/sql`, statements in, results as JSON, CSV or an Arrow IPC
//!   stream, chosen by `Accept`.
//! - [`error`]: [`error::ApiError`], the JSON body of every error, with a stable code,
//!   the SQLSTATE where there is one, and the HTTP status that goes with it.

use std::net::SocketAddr;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::info;
use utoipa::OpenApi;

use crate::engine::Engine;
use crate::error::{Error, Result};

pub mod error;
pub mod sql;

/// The largest request body the API reads; a bigger one is refused with 413 before it
/// is read whole. Statements are further bounded by `max_statement_bytes`.
pub const MAX_REQUEST_BYTES: usize = 16 << 20;

/// The OpenAPI document of the API.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "dstream HTTP API",
        description = "Ad-hoc SQL over the committed state of continuous queries, and \
                       definitions. Every error is a JSON `ApiError`."
    ),
    paths(sql::sql, openapi),
    components(schemas(
        sql::SqlRequest,
        sql::SqlResponse,
        sql::StatementOutcome,
        sql::Column,
        error::ApiError,
        error::ErrorDetail
    ))
)]
pub struct ApiDoc;

/// The OpenAPI document of this API.
#[utoipa::path(
    get,
    path = "/v1/openapi.json",
    responses((status = 200, description = "The OpenAPI 3 document of this API", content_type = "application/json"))
)]
pub async fn openapi() -> axum::Json<utoipa::openapi::OpenApi> {
    axum::Json(ApiDoc::openapi())
}

/// The routes of the API over `engine`.
pub fn router(engine: Engine) -> Router {
    Router::new()
        .route("/v1/sql", post(sql::sql))
        .route("/v1/openapi.json", get(openapi))
        .fallback(error::not_found)
        .layer(DefaultBodyLimit::max(MAX_REQUEST_BYTES))
        .with_state(engine)
}

/// Serves the API on `listener` until `shutdown` is cancelled; requests in flight
/// then finish.
pub async fn serve(
    listener: TcpListener,
    engine: Engine,
    shutdown: CancellationToken,
) -> Result<()> {
    let addr: SocketAddr = listener.local_addr()?;
    info!(%addr, "serving the HTTP API (POST /v1/sql, GET /v1/openapi.json)");
    axum::serve(listener, router(engine))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
        .map_err(|e| Error::Internal(format!("HTTP API on {addr}: {e}")))
}
