//! The wire contract between the coordinator and its workers, apart from the
//! services that answer it: the control-plane messages ([`proto`], from
//! `proto/dstream.proto`), how rows and timelines travel in them ([`codec`]), the
//! transport settings both sides use, [`WorkerClient`], the typed client the
//! coordinator calls workers through, and [`FlightPeers`], the data plane's client.
//!
//! The worker's side lives in [`crate::worker`]; the coordinator's in
//! `dstream-server`. Both import the contract from here.
//!
//! # Layout
//! - [`proto`]: the generated messages and services.
//! - [`codec`]: Arrow IPC bytes of batches, and timelines on the wire.
//! - [`client`]: [`WorkerClient`], one method per worker call.
//! - [`flight`]: [`FlightPeers`], the client side of the Arrow Flight data plane.

use std::time::Duration;

use crate::error::{Error, Result};

pub mod client;
pub mod codec;
pub mod flight;

pub use client::WorkerClient;
pub use codec::{ipc_bytes, read_ipc};
pub use flight::FlightPeers;

/// The generated control-plane code.
#[allow(clippy::all, missing_docs)]
pub mod proto {
    tonic::include_proto!("dstream.v1");
}

/// The largest gRPC message either side accepts: Flight batches are split well below
/// this, and control messages are small.
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024 * 1024;

/// HTTP/2 flow-control windows of data-plane connections. The protocol's default
/// (64 KiB) makes a sender wait for a window update every 64 KiB, which on a fast
/// link caps a block or shuffle transfer far below what the link carries.
pub const STREAM_WINDOW_BYTES: u32 = 8 * 1024 * 1024;
pub const CONNECTION_WINDOW_BYTES: u32 = 32 * 1024 * 1024;

/// A channel to a peer (a worker, or the coordinator).
pub fn channel(address: &str) -> Result<tonic::transport::Channel> {
    Ok(tonic::transport::Endpoint::from_shared(address.to_string())
        .map_err(|e| Error::Internal(format!("bad address '{address}': {e}")))?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .initial_stream_window_size(STREAM_WINDOW_BYTES)
        .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
        .connect_lazy())
}

/// A control-plane status for an executor error: user mistakes (bad options) become
/// `InvalidArgument`, everything else `Internal`.
pub fn status(e: &Error) -> tonic::Status {
    match e {
        Error::Config(m) => tonic::Status::invalid_argument(m.clone()),
        Error::Planner(p) => tonic::Status::invalid_argument(p.to_string()),
        other => tonic::Status::internal(other.to_string()),
    }
}
