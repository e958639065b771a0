//! Test support for dstream: a real server started in-process, and a sqllogictest
//! driver that talks to it over the Postgres wire protocol.
//!
//! [`TestServer::start`] binds `127.0.0.1:0`, runs dstream with the manual clock in a
//! temporary data directory and stops it when dropped. [`PgDb`] runs statements with
//! tokio-postgres's simple query protocol, as psql does.
//!
//! The `.slt` files live in `sql-tests/slt/`; `tests/slt.rs` runs each against a fresh
//! server. Set `DSTREAM_SLT_COMPLETE=1` to rewrite their expected output.

pub mod openapi;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use dstream_server::config::{ClockKind, ServeConfig, WorkerMode};
use sqllogictest::{DBOutput, DefaultColumnType};
use tokio::net::TcpListener;
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};
use tokio_util::sync::CancellationToken;

/// A dstream server running in this process.
pub struct TestServer {
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    /// The running engine (`None` if it failed to start; `stop` reports why).
    pub engine: Option<dstream_server::Engine>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<dstream_server::Result<()>>,
    _temp: Option<tempfile::TempDir>,
}

impl TestServer {
    /// Starts a server with the manual clock in a fresh temporary directory.
    pub async fn start() -> std::io::Result<TestServer> {
        TestServer::start_with(|_| {}).await
    }

    /// Starts a server in a fresh temporary directory, with the test configuration
    /// changed by `configure` (e.g. to use the real clock).
    pub async fn start_with(
        configure: impl FnOnce(&mut ServeConfig),
    ) -> std::io::Result<TestServer> {
        let temp = tempfile::tempdir()?;
        let dir = temp.path().join("data");
        let mut server = TestServer::launch(&dir, configure).await?;
        server._temp = Some(temp);
        Ok(server)
    }

    /// Starts a server with the manual clock on an existing data directory.
    pub async fn start_in(data_dir: &Path) -> std::io::Result<TestServer> {
        TestServer::launch(data_dir, |_| {}).await
    }

    async fn launch(
        data_dir: &Path,
        configure: impl FnOnce(&mut ServeConfig),
    ) -> std::io::Result<TestServer> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let mut config = ServeConfig {
            data_dir: data_dir.to_path_buf(),
            pg_addr: addr,
            clock: ClockKind::Manual,
            batch_interval: Duration::from_secs(1),
            partitions: 4,
            // Small blocks, so that intervals have several map tasks in every test.
            block_rows: 64,
            workers: 2,
            worker_mode: test_worker_mode(),
            // The HTTP API on a free port (see `TestServer::http_addr`).
            http_addr: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
            ..ServeConfig::default()
        };
        configure(&mut config);
        let shutdown = CancellationToken::new();
        let grpc = TcpListener::bind("127.0.0.1:0").await?;
        let (engine_tx, engine_rx) = tokio::sync::oneshot::channel();
        #[allow(clippy::disallowed_methods)] // kept in `task`, awaited by `stop`
        let task = tokio::spawn(dstream_server::run_with(
            config,
            listener,
            grpc,
            shutdown.clone(),
            move |engine| {
                let _ = engine_tx.send(engine.clone());
            },
        ));
        // The server starts its workers and waits for them before it takes queries.
        let engine = engine_rx.await.ok();
        Ok(TestServer {
            addr,
            data_dir: data_dir.to_path_buf(),
            engine,
            shutdown,
            task,
            _temp: None,
        })
    }

    /// The base URL of the server's HTTP API, e.g. `http://127.0.0.1:40123`.
    pub fn http_url(&self) -> String {
        let addr = self
            .engine
            .as_ref()
            .and_then(|e| e.http_addr())
            .expect("the test server serves the HTTP API");
        format!("http://{addr}")
    }

    /// A connected tokio-postgres client.
    pub async fn client(&self) -> Result<Client, tokio_postgres::Error> {
        connect(self.addr).await
    }

    /// Stops the server, waits for it to finish, and requires a clean shutdown.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        match (&mut self.task).await {
            Ok(Ok(())) => {}
            other => panic!("the server did not stop cleanly: {other:?}"),
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// How test servers run their two workers: inside the test process (the default), or
/// as `dstream worker` processes when `DSTREAM_TEST_WORKERS=process`. The binary is
/// `$DSTREAM_BIN`, or `dstream` next to the test executable's directory.
pub fn test_worker_mode() -> WorkerMode {
    match std::env::var("DSTREAM_TEST_WORKERS").as_deref() {
        Ok("process") => WorkerMode::Process(Some(dstream_binary())),
        _ => WorkerMode::InProcess,
    }
}

/// The `dstream` binary the tests run.
pub fn dstream_binary() -> PathBuf {
    if let Ok(bin) = std::env::var("DSTREAM_BIN") {
        return PathBuf::from(bin);
    }
    // target/<profile>/deps/<test> -> target/<profile>/dstream
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent()?.parent().map(|d| d.join("dstream")))
        .unwrap_or_else(|| PathBuf::from("dstream"))
}

/// A `dstream serve` process: the child, a client connected to it, and its pgwire
/// address.
pub struct ServeProcess {
    pub child: tokio::process::Child,
    pub client: Client,
    pub addr: SocketAddr,
}

impl ServeProcess {
    /// Starts `dstream serve` on `data` in its own process group (so that it can be
    /// killed with its workers, like a machine that fails), with the manual clock,
    /// two worker processes of one core each, metrics off, `args` after those and
    /// `env` added to its environment; returns once a client is connected. Its log
    /// says only errors unless `RUST_LOG` asks for more.
    pub async fn start(data: &Path, args: &[&str], env: &[(&str, &str)]) -> ServeProcess {
        // Two distinct free ports, held together while they are picked.
        let held: Vec<std::net::TcpListener> = (0..2)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("a free port"))
            .collect();
        let port = |i: usize| held[i].local_addr().expect("a port").to_string();
        let (pg, grpc) = (port(0), port(1));
        drop(held);
        let child = tokio::process::Command::new(dstream_binary())
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "error".into()),
            )
            .envs(env.iter().copied())
            .arg("serve")
            .arg("--data-dir")
            .arg(data)
            .args([
                "--pg-addr",
                &pg,
                "--grpc-addr",
                &grpc,
                "--metrics-addr",
                "off",
                "--http-addr",
                "off",
            ])
            .args(["--clock", "manual", "--workers", "2", "--worker-cores", "1"])
            .args(args)
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .expect("start dstream serve");
        let addr: SocketAddr = pg.parse().expect("an address");
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            match connect(addr).await {
                Ok(client) => {
                    return ServeProcess {
                        child,
                        client,
                        addr,
                    };
                }
                Err(e) if std::time::Instant::now() > deadline => {
                    panic!("connect to {addr}: {e}")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// Kills the server and its workers at once (SIGKILL to the process group), and
    /// waits for it.
    pub async fn kill(mut self) {
        if let Some(pid) = self.child.id() {
            // `--`: without it, procps's kill takes `-pid` for an option.
            let killed = std::process::Command::new("kill")
                .args(["-KILL", "--", &format!("-{pid}")])
                .status();
            assert!(
                killed.is_ok_and(|s| s.success()),
                "kill the process group {pid}"
            );
        }
        let waited = tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await;
        assert!(waited.is_ok(), "the killed server did not end");
    }
}

/// Connects to a dstream server, retrying briefly while it starts.
pub async fn connect(addr: SocketAddr) -> Result<Client, tokio_postgres::Error> {
    let conninfo = format!(
        "host={} port={} user=test dbname=dstream",
        addr.ip(),
        addr.port()
    );
    let mut attempt = 0;
    loop {
        match tokio_postgres::connect(&conninfo, NoTls).await {
            Ok((client, connection)) => {
                // The connection task ends when the client is dropped.
                #[allow(clippy::disallowed_methods)]
                tokio::spawn(connection);
                return Ok(client);
            }
            Err(e) if attempt < 50 => {
                attempt += 1;
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// An error as sqllogictest sees it: the message and the SQLSTATE.
#[derive(Debug)]
pub struct PgError(pub String);

impl std::fmt::Display for PgError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PgError {}

impl From<tokio_postgres::Error> for PgError {
    fn from(e: tokio_postgres::Error) -> Self {
        match e.as_db_error() {
            Some(db) => PgError(format!("{} (SQLSTATE {})", db.message(), db.code().code())),
            None => PgError(e.to_string()),
        }
    }
}

/// A row's values as text: NULL as `NULL`, empty strings as `(empty)`.
fn row_text(row: &tokio_postgres::SimpleQueryRow) -> Vec<String> {
    (0..row.len())
        .map(|i| match row.get(i) {
            None => "NULL".to_string(),
            Some("") => "(empty)".to_string(),
            Some(v) => v.to_string(),
        })
        .collect()
}

/// Runs a query; its rows as text: NULL as `NULL`, empty strings as `(empty)`.
pub async fn simple_rows(client: &Client, sql: &str) -> Result<Vec<Vec<String>>, PgError> {
    let mut rows = Vec::new();
    for message in client.simple_query(sql).await? {
        if let SimpleQueryMessage::Row(row) = message {
            rows.push(row_text(&row));
        }
    }
    Ok(rows)
}

/// A sqllogictest database over one pgwire connection.
pub struct PgDb {
    client: Client,
}

impl PgDb {
    pub async fn connect(addr: SocketAddr) -> Result<PgDb, PgError> {
        Ok(PgDb {
            client: connect(addr).await?,
        })
    }
}

#[async_trait::async_trait]
impl sqllogictest::AsyncDB for PgDb {
    type Error = PgError;
    type ColumnType = DefaultColumnType;

    async fn run(&mut self, sql: &str) -> Result<DBOutput<Self::ColumnType>, Self::Error> {
        let mut rows = Vec::new();
        let mut columns = None;
        let mut count = 0;
        for message in self.client.simple_query(sql).await? {
            match message {
                SimpleQueryMessage::RowDescription(cols) => columns = Some(cols.len()),
                SimpleQueryMessage::Row(row) => {
                    columns = Some(row.len());
                    rows.push(row_text(&row));
                }
                SimpleQueryMessage::CommandComplete(n) => count = n,
                _ => {}
            }
        }
        match columns {
            Some(n) => Ok(DBOutput::Rows {
                types: vec![DefaultColumnType::Any; n],
                rows,
            }),
            None => Ok(DBOutput::StatementComplete(count)),
        }
    }

    async fn shutdown(&mut self) {}

    fn engine_name(&self) -> &str {
        "dstream"
    }

    async fn sleep(dur: Duration) {
        tokio::time::sleep(dur).await;
    }
}
