//! The HTTP API: ad-hoc SQL over the committed state, definitions, live results and
//! the status of the server, for clients that speak HTTP rather than the Postgres
//! wire protocol.
//!
//! [`serve`] runs the [`router`] on a listener until shutdown. Every route is in the
//! OpenAPI document the server serves at `GET /v1/openapi.json` ([`ApiDoc`]), derived
//! from the handlers and their types, so the document cannot drift from the code.
//!
//! - [`sql`]: `POST /v1/sql`, statements in, results as JSON, CSV or an Arrow IPC
//!   stream, chosen by `Accept`.
//! - [`status`]: the server, its sources, tables, views and workers, and its recent
//!   intervals, checkpoints and recoveries.
//! - [`ingest`]: `POST /v1/sources/{name}`, records pushed to an `http` source.
//! - [`changes`]: `GET /v1/views/{name}/changes`, a view's live results as
//!   Server-Sent Events or over a WebSocket, resumable.
//! - [`limits`]: the size and time a request may take.
//! - [`error`]: [`error::ApiError`], the JSON body of every error, with a stable code,
//!   the SQLSTATE where there is one, and the HTTP status that goes with it.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use utoipa::OpenApi;

use crate::engine::Engine;
use crate::error::Result;

pub mod changes;
pub mod error;
pub mod ingest;
pub mod limits;
pub mod sql;
pub mod status;

pub use limits::MAX_REQUEST_BYTES;

/// How long requests in flight (live result streams, say) may go on after shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// The OpenAPI document of the API.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "dstream HTTP API",
        description = "Ad-hoc SQL over the committed state of continuous queries, \
                       definitions, live results and the status of the server. Every \
                       error is a JSON `ApiError`."
    ),
    paths(
        sql::sql,
        status::server_status,
        status::sources,
        status::source,
        ingest::ingest,
        status::tables,
        status::table,
        status::views,
        status::view,
        changes::changes,
        status::workers,
        status::intervals,
        status::checkpoints,
        status::recoveries,
        openapi
    ),
    components(schemas(
        sql::SqlRequest,
        sql::SqlResponse,
        sql::StatementOutcome,
        sql::Column,
        status::ServerStatus,
        crate::status::SourceStatus,
        ingest::IngestResponse,
        crate::status::TableStatus,
        crate::status::ViewStatus,
        changes::ChangeMessage,
        crate::system_tables::WorkerRow,
        status::IntervalRow,
        status::CheckpointRow,
        status::RecoveryRow,
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

/// The media type of a request's body, without parameters, in lower case.
pub fn content_type(headers: &axum::http::HeaderMap) -> Option<String> {
    let value = headers
        .get(axum::http::header::CONTENT_TYPE)?
        .to_str()
        .ok()?;
    let media = value.split(';').next().unwrap_or_default();
    Some(media.trim().to_ascii_lowercase())
}

/// Cancelled when the server shuts down: live result streams end then.
#[derive(Clone, Debug)]
pub struct Closing(pub CancellationToken);

/// The routes of the API over `engine`; live result streams end when `closing` is
/// cancelled.
pub fn router(engine: Engine, closing: CancellationToken) -> Router {
    let request_timeout = engine.config().http_request_timeout;
    Router::new()
        .route("/v1/sql", post(sql::sql))
        .route("/v1/status", get(status::server_status))
        .route("/v1/sources", get(status::sources))
        .route(
            "/v1/sources/{name}",
            get(status::source).post(ingest::ingest),
        )
        .route("/v1/tables", get(status::tables))
        .route("/v1/tables/{name}", get(status::table))
        .route("/v1/views", get(status::views))
        .route("/v1/views/{name}", get(status::view))
        .route("/v1/views/{name}/changes", get(changes::changes))
        .route("/v1/workers", get(status::workers))
        .route("/v1/intervals", get(status::intervals))
        .route("/v1/checkpoints", get(status::checkpoints))
        .route("/v1/recoveries", get(status::recoveries))
        .route("/v1/openapi.json", get(openapi))
        .fallback(error::not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            request_timeout,
            limits::read_body,
        ))
        .layer(DefaultBodyLimit::disable())
        .layer(axum::Extension(Closing(closing)))
        .with_state(engine)
}

/// Serves the API on `listener` until `shutdown` is cancelled; requests in flight
/// then have [`SHUTDOWN_GRACE`] to finish.
///
/// Each connection is served by hyper with a deadline on its request headers
/// (`http_request_timeout`); the router reads bodies within theirs.
pub async fn serve(
    listener: TcpListener,
    engine: Engine,
    shutdown: CancellationToken,
) -> Result<()> {
    let addr: SocketAddr = listener.local_addr()?;
    info!(%addr, "serving the HTTP API (see GET /v1/openapi.json)");
    let header_timeout = engine.config().http_request_timeout;
    let router = router(engine, shutdown.clone());
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors, say: wait rather than spin.
                warn!(%addr, error = %e, "could not accept an HTTP connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let service = TowerToHyperService::new(router.clone());
        let closing = shutdown.clone();
        connections.spawn(async move {
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            tokio::pin!(connection);
            let served = tokio::select! {
                served = connection.as_mut() => served,
                _ = closing.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    match tokio::time::timeout(SHUTDOWN_GRACE, connection.as_mut()).await {
                        Ok(served) => served,
                        Err(_) => Ok(()),
                    }
                }
            };
            if let Err(e) = served {
                debug!(%peer, error = %e, "HTTP connection ended");
            }
        });
    }
    // Every connection has the grace period, at once.
    while connections.join_next().await.is_some() {}
    Ok(())
}
