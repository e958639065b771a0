//! dstream-server: the coordinator and the front doors of dstream, and the `dstream`
//! binary.
//!
//! The entry point is [`run`], which starts an [`Engine`] and serves the Postgres wire
//! protocol until shutdown; tests call it on `127.0.0.1:0` with a manual clock.
//!
//! # Layout
//! - [`engine`]: [`Engine`], the coordinator: interval loop, snapshots, commits.
//! - [`cluster`]: the workers: membership, liveness, the per-interval scheduler,
//!   remote reads, local worker processes.
//! - [`state`]: [`state::EngineState`], what the coordinator changes: sources, views,
//!   tables, placement.
//! - [`session`]: executing statements.
//! - [`subscribe`]: `SUBSCRIBE` streams.
//! - [`system_tables`]: `dstream_intervals`, `dstream_workers`, `dstream_checkpoints`
//!   and `dstream_recoveries`.
//! - [`metrics`]: the same figures as Prometheus metrics.
//! - [`clock`]: the injected [`clock::IntervalClock`], real and manual.
//! - [`pgwire`]: the Postgres wire protocol.
//! - [`http`]: the HTTP API (`POST /v1/sql`) and its OpenAPI document.
//! - [`config`]: [`config::ServeConfig`] from flags, environment and TOML.
//! - [`error`]: the crate's [`Error`] and [`Result`], and SQLSTATEs.

// Nothing a client, a record or the network sends may reach a panic: outside tests
// (where failing loudly is the point) `expect`, `panic!`, slice indexing and unchecked
// arithmetic are refused, as `unwrap` is for the whole workspace.
#![cfg_attr(
    not(test),
    warn(
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing,
        clippy::arithmetic_side_effects
    )
)]

pub mod changes;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod engine;
pub mod error;
pub mod http;
pub mod metrics;
pub mod pgwire;
pub mod session;
pub mod state;
pub mod status;
pub mod subscribe;
pub mod system_tables;

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use engine::Engine;
pub use error::{Error, Result};

use crate::clock::{IntervalClock, ManualClock, RealClock};
use crate::config::{ClockKind, ServeConfig};

/// The clock a configuration asks for. The manual clock's first interval starts at
/// 2026-01-01 00:00:00 UTC, so that test output is the same every run.
pub fn clock_for(config: &ServeConfig) -> Arc<dyn IntervalClock> {
    match config.clock {
        ClockKind::Real => Arc::new(RealClock),
        ClockKind::Manual => Arc::new(ManualClock::new(1_767_225_600_000_000_000)),
    }
}

/// Runs the server: starts the coordinator (its gRPC service on `config.grpc_addr`)
/// and its local workers, and serves pgwire on `listener` until `shutdown` is
/// cancelled.
pub async fn run(
    config: ServeConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<()> {
    let grpc = TcpListener::bind(config.grpc_addr).await.map_err(|e| {
        Error::Config(format!(
            "cannot listen for workers on {}: {e}",
            config.grpc_addr
        ))
    })?;
    run_with(config, listener, grpc, shutdown, |_| {}).await
}

/// [`run`] with the coordinator's gRPC listener given, calling `started` with the
/// engine once it runs (tests use it to reach the workers).
pub async fn run_with(
    config: ServeConfig,
    listener: TcpListener,
    grpc: TcpListener,
    shutdown: CancellationToken,
    started: impl FnOnce(&Engine),
) -> Result<()> {
    let http = match config.http_addr {
        Some(addr) => Some(TcpListener::bind(addr).await.map_err(|e| {
            Error::Config(format!(
                "cannot listen for the HTTP API on {addr}: {e} (set http_addr, or off)"
            ))
        })?),
        None => None,
    };
    let clock = clock_for(&config);
    let engine = Engine::start(config, clock, grpc, shutdown.clone()).await?;
    if let Some(http) = &http {
        engine.set_http_addr(http.local_addr()?);
    }
    started(&engine);
    let pg = async {
        let served = pgwire::serve(listener, engine.clone(), shutdown.clone()).await;
        shutdown.cancel();
        served
    };
    let api = async {
        match http {
            Some(http) => http::serve(http, engine.clone(), shutdown.clone()).await,
            None => Ok(()),
        }
    };
    let (served, api_served) = tokio::join!(pg, api);
    shutdown.cancel();
    engine.stopped().await;
    served.and(api_served)
}
