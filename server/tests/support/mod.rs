//! A dstream server for the CLI tests: its coordinator in this process, on
//! `127.0.0.1:0`, with two worker processes, the manual clock and a temporary data
//! directory. It stops when dropped.

use std::time::Duration;

use dstream_server::config::{ClockKind, ServeConfig, WorkerMode};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub struct Server {
    pub port: u16,
    /// A scratch directory that lives as long as the server (data is below it).
    pub dir: tempfile::TempDir,
    shutdown: CancellationToken,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub async fn start() -> Server {
    let dir = tempfile::tempdir().expect("tempdir");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let config = ServeConfig {
        data_dir: dir.path().join("data"),
        pg_addr: addr,
        clock: ClockKind::Manual,
        batch_interval: Duration::from_secs(1),
        grpc_addr: "127.0.0.1:0".parse().expect("address"),
        worker_mode: WorkerMode::Process(Some(env!("CARGO_BIN_EXE_dstream").into())),
        http_addr: None,
        ..ServeConfig::default()
    };
    let shutdown = CancellationToken::new();
    #[allow(clippy::disallowed_methods)] // stops when `Server` drops and cancels `shutdown`
    tokio::spawn(dstream_server::run(config, listener, shutdown.clone()));
    Server {
        port: addr.port(),
        dir,
        shutdown,
    }
}
