//! The `dstream` binary: `dstream serve` runs the coordinator with local workers,
//! `dstream coordinator` and `dstream worker` run the same parts separately, and
//! `dstream sql` is the interactive SQL client.

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

mod cli;

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use dstream_server::config::{ClockKind, FileConfig, ServeConfig};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::info;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(
    name = "dstream",
    version,
    about = "A continuous-query server over discretized streams"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the server: the coordinator, its local worker processes and a local data
    /// directory.
    Serve(ServeArgs),
    /// Run only the coordinator; workers join with `dstream worker --coordinator URL`.
    Coordinator(ServeArgs),
    /// Run a worker that joins a coordinator.
    Worker(WorkerArgs),
    /// Interactive SQL client (psql-like) for a running server.
    Sql(cli::SqlArgs),
}

/// Every flag can also be set with its environment variable or in the `[serve]`
/// section of a TOML file given with --config; flags win over the environment, which
/// wins over the file.
#[derive(Args, Debug)]
struct ServeArgs {
    /// TOML configuration file.
    #[arg(long, env = "DSTREAM_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory for the catalog and table data [default: ./dstream-data].
    #[arg(long, env = "DSTREAM_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Postgres wire protocol address [default: 127.0.0.1:6875].
    #[arg(long, env = "DSTREAM_PG_ADDR")]
    pg_addr: Option<SocketAddr>,
    /// Width of one interval, e.g. 1s or 250ms [default: 1s].
    #[arg(long, env = "DSTREAM_BATCH_INTERVAL")]
    batch_interval: Option<String>,
    /// State partitions per materialized view [default: 4].
    #[arg(long, env = "DSTREAM_PARTITIONS")]
    partitions: Option<usize>,
    /// Interval clock: real (wall clock) or manual (ADVANCE n) [default: real].
    #[arg(long, env = "DSTREAM_CLOCK", value_enum)]
    clock: Option<ClockKind>,
    /// How long raw source rows stay queryable, e.g. 5m [default: 5m].
    #[arg(long, env = "DSTREAM_SOURCE_RETENTION")]
    source_retention: Option<String>,
    /// Most rows in one input block; each block is one map task [default: 65536].
    #[arg(long, env = "DSTREAM_BLOCK_ROWS")]
    block_rows: Option<usize>,
    /// Where the coordinator listens for workers (gRPC) [default: 127.0.0.1:6876].
    #[arg(long, env = "DSTREAM_GRPC_ADDR")]
    grpc_addr: Option<SocketAddr>,
    /// Worker processes `serve` starts [default: 2; `coordinator`: 0].
    #[arg(long, env = "DSTREAM_WORKERS")]
    workers: Option<usize>,
    /// Start local workers that die again (true or false) [default: true].
    #[arg(long, env = "DSTREAM_RESTART_WORKERS")]
    restart_workers: Option<bool>,
    /// Task slots per local worker [default: the cores shared among the workers].
    #[arg(long, env = "DSTREAM_WORKER_CORES")]
    worker_cores: Option<usize>,
    /// Object store for checkpoints, the catalog and table data: file:///path,
    /// s3://bucket/prefix or memory://name [default: file:// + the data directory].
    #[arg(long, env = "DSTREAM_STORE")]
    store: Option<String>,
    /// S3-compatible endpoint of an s3:// store [default: AWS_ENDPOINT_URL, or AWS].
    #[arg(long, env = "DSTREAM_S3_ENDPOINT")]
    s3_endpoint: Option<String>,
    /// Region of an s3:// store [default: AWS_REGION, or us-east-1].
    #[arg(long, env = "DSTREAM_S3_REGION")]
    s3_region: Option<String>,
    /// Checkpoint every N intervals; 0: only by time [default: 10].
    #[arg(long, env = "DSTREAM_CHECKPOINT_INTERVALS")]
    checkpoint_intervals: Option<u64>,
    /// Checkpoint at least this often, e.g. 30s, or off [default: 10s].
    #[arg(long, env = "DSTREAM_CHECKPOINT_EVERY")]
    checkpoint_every: Option<String>,
    /// Committed checkpoints kept in the store [default: 3].
    #[arg(long, env = "DSTREAM_CHECKPOINTS_KEPT")]
    checkpoints_kept: Option<usize>,
    /// Start speculative copies of straggling tasks: true or false [default: true].
    #[arg(long, env = "DSTREAM_SPECULATION")]
    speculation: Option<bool>,
    /// A task straggles once it runs this many times its stage's median [default: 1.5].
    #[arg(long, env = "DSTREAM_SPECULATION_MULTIPLIER")]
    speculation_multiplier: Option<f64>,
    /// ... and at least this long [default: 100ms].
    #[arg(long, env = "DSTREAM_SPECULATION_MIN")]
    speculation_min: Option<String>,
    /// Where Prometheus metrics are served (/metrics), or off [default: 127.0.0.1:6877].
    #[arg(long, env = "DSTREAM_METRICS_ADDR")]
    metrics_addr: Option<String>,
    /// Where the HTTP API listens (POST /v1/sql), or off [default: 127.0.0.1:6878].
    #[arg(long, env = "DSTREAM_HTTP_ADDR")]
    http_addr: Option<String>,
    /// Longest statement text, e.g. 1MiB [default: 1MiB].
    #[arg(long, env = "DSTREAM_MAX_STATEMENT_BYTES")]
    max_statement_bytes: Option<String>,
    /// Deepest nesting of expressions in a statement [default: 1000].
    #[arg(long, env = "DSTREAM_MAX_EXPRESSION_DEPTH")]
    max_expression_depth: Option<usize>,
    /// Most expressions in a statement [default: 100000].
    #[arg(long, env = "DSTREAM_MAX_EXPRESSION_NODES")]
    max_expression_nodes: Option<usize>,
    /// Most windows a row belongs to: a HOP window's size / slide [default: 1000].
    #[arg(long, env = "DSTREAM_MAX_WINDOWS_PER_ROW")]
    max_windows_per_row: Option<u64>,
    /// Most windows ending in one interval: batch interval / slide [default: 1000].
    #[arg(long, env = "DSTREAM_MAX_WINDOWS_PER_INTERVAL")]
    max_windows_per_interval: Option<u64>,
    /// Queries running longer are cancelled, e.g. 30s, or off [default: 5m].
    #[arg(long, env = "DSTREAM_STATEMENT_TIMEOUT")]
    statement_timeout: Option<String>,
    /// Memory one ad-hoc query may use, e.g. 512MiB [default: 1GiB].
    #[arg(long, env = "DSTREAM_QUERY_MEMORY")]
    query_memory: Option<String>,
    /// Largest result of one ad-hoc query [default: 256MiB].
    #[arg(long, env = "DSTREAM_MAX_RESULT_BYTES")]
    max_result_bytes: Option<String>,
    /// Postgres connections served at once [default: 100].
    #[arg(long, env = "DSTREAM_MAX_CONNECTIONS")]
    max_connections: Option<usize>,
    /// Time a new connection has to send its startup message [default: 30s].
    #[arg(long, env = "DSTREAM_STARTUP_TIMEOUT")]
    startup_timeout: Option<String>,
    /// Close connections silent both ways this long, or off [default: 1h].
    #[arg(long, env = "DSTREAM_IDLE_TIMEOUT")]
    idle_timeout: Option<String>,
    /// Disconnect a client that takes none of the server's answers this long
    /// [default: 60s].
    #[arg(long, env = "DSTREAM_SEND_TIMEOUT")]
    send_timeout: Option<String>,
    /// Time an HTTP client has to send a request's headers, and then its body
    /// [default: 30s].
    #[arg(long, env = "DSTREAM_HTTP_REQUEST_TIMEOUT")]
    http_request_timeout: Option<String>,
}

#[derive(Args, Debug)]
struct WorkerArgs {
    /// The coordinator's gRPC address.
    #[arg(
        long,
        env = "DSTREAM_COORDINATOR",
        default_value = "http://127.0.0.1:6876"
    )]
    coordinator: String,
    /// Where this worker listens for the coordinator and its peers [default: an
    /// ephemeral port on 127.0.0.1].
    #[arg(long, env = "DSTREAM_WORKER_ADDR", default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// The address others reach this worker at, if not the listen address (e.g.
    /// http://worker-3.dstream:7000 behind a Kubernetes service).
    #[arg(long, env = "DSTREAM_ADVERTISE")]
    advertise: Option<String>,
    /// Task slots: how many tasks run at once [default: the machine's cores].
    #[arg(long, env = "DSTREAM_WORKER_CORES")]
    cores: Option<usize>,
    /// Fault injection, for testing and benchmarks: every task of this worker first
    /// waits this long (e.g. 200ms), making it a straggler.
    #[arg(long, env = "DSTREAM_FAULT_TASK_DELAY")]
    fault_task_delay: Option<String>,
    /// Fault injection, for testing: a task of this view aborts the worker process.
    #[arg(long, env = "DSTREAM_FAULT_ABORT_VIEW")]
    fault_abort_view: Option<String>,
}

impl ServeArgs {
    /// The defaults, then the file, then the flags (and their environment variables),
    /// each applied the same way.
    fn into_config(self) -> anyhow::Result<ServeConfig> {
        let mut config = ServeConfig::default();
        if let Some(path) = &self.config {
            FileConfig::load(path)?.apply(&mut config)?;
        }
        FileConfig {
            data_dir: self.data_dir,
            pg_addr: self.pg_addr,
            batch_interval: self.batch_interval,
            partitions: self.partitions,
            clock: self.clock,
            source_retention: self.source_retention,
            block_rows: self.block_rows,
            grpc_addr: self.grpc_addr,
            workers: self.workers,
            restart_workers: self.restart_workers,
            worker_cores: self.worker_cores,
            store: self.store,
            s3_endpoint: self.s3_endpoint,
            s3_region: self.s3_region,
            checkpoint_intervals: self.checkpoint_intervals,
            checkpoint_every: self.checkpoint_every,
            checkpoints_kept: self.checkpoints_kept,
            speculation: self.speculation,
            speculation_multiplier: self.speculation_multiplier,
            speculation_min: self.speculation_min,
            metrics_addr: self.metrics_addr,
            http_addr: self.http_addr,
            max_statement_bytes: self.max_statement_bytes,
            max_expression_depth: self.max_expression_depth,
            max_expression_nodes: self.max_expression_nodes,
            max_windows_per_row: self.max_windows_per_row,
            max_windows_per_interval: self.max_windows_per_interval,
            statement_timeout: self.statement_timeout,
            query_memory: self.query_memory,
            max_result_bytes: self.max_result_bytes,
            max_connections: self.max_connections,
            startup_timeout: self.startup_timeout,
            idle_timeout: self.idle_timeout,
            send_timeout: self.send_timeout,
            http_request_timeout: self.http_request_timeout,
            ..FileConfig::default()
        }
        .apply(&mut config)?;
        config.validate()?;
        Ok(config)
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Threads named for the part they run, as `top -H` and profilers show them.
    let part = match &cli.command {
        Command::Serve(_) | Command::Coordinator(_) => "dstream-coord",
        Command::Worker(_) => "dstream-worker",
        Command::Sql(_) => "dstream-sql",
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name(part)
        // Statements and tasks run on their own deep-stacked threads; these are as
        // deep, so that no thread of the process is the shallow one.
        .thread_stack_size(dstream_planner::limits::STATEMENT_STACK_BYTES)
        .build()
        .context("cannot start the async runtime")?;
    let logging = || {
        tracing_subscriber::fmt()
            // Colour only on a terminal: a log file or collector gets plain text.
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "info".into()),
            )
            .init()
    };
    match cli.command {
        Command::Serve(args) => {
            logging();
            let config = args.into_config()?;
            runtime.block_on(serve(config))
        }
        Command::Coordinator(mut args) => {
            logging();
            args.workers = Some(args.workers.unwrap_or(0));
            let config = args.into_config()?;
            runtime.block_on(serve(config))
        }
        Command::Worker(args) => {
            logging();
            runtime.block_on(worker(args))
        }
        Command::Sql(args) => {
            let code = runtime.block_on(cli::run(args))?;
            std::process::exit(code);
        }
    }
}

async fn serve(config: ServeConfig) -> anyhow::Result<()> {
    let listener = TcpListener::bind(config.pg_addr)
        .await
        .with_context(|| format!("cannot listen on {}", config.pg_addr))?;
    if let Some(addr) = config.metrics_addr {
        dstream_server::metrics::install(addr)?;
        info!(%addr, "serving Prometheus metrics at /metrics");
    }
    info!(
        data_dir = %config.data_dir.display(),
        store = %config.store_config().url,
        batch_interval = ?config.batch_interval,
        partitions = config.partitions,
        clock = ?config.clock,
        "dstream starting; connect with: dstream sql -p {}",
        config.pg_addr.port()
    );
    let shutdown = CancellationToken::new();
    #[allow(clippy::disallowed_methods)] // awaited below
    let mut server = tokio::spawn(dstream_server::run(config, listener, shutdown.clone()));
    tokio::select! {
        finished = &mut server => {
            finished.context("server task")??;
            return Ok(());
        }
        signal = stop_signal() => {
            signal?;
            info!("shutting down");
            shutdown.cancel();
        }
    }
    server.await.context("server task")??;
    Ok(())
}

async fn worker(args: WorkerArgs) -> anyhow::Result<()> {
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    info!(
        coordinator = %args.coordinator,
        address = %listener.local_addr()?,
        "dstream worker starting"
    );
    let config = dstream_executor::worker::WorkerConfig {
        coordinator: args.coordinator,
        advertise: args.advertise,
        cores: args
            .cores
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
        // From the environment (AWS_ACCESS_KEY_ID, ...) when the store is opened.
        s3_credentials: Default::default(),
        task_delay: match &args.fault_task_delay {
            Some(text) => dstream_server::config::parse_duration(text)?,
            None => std::time::Duration::ZERO,
        },
        abort_view: args.fault_abort_view,
    };
    let shutdown = CancellationToken::new();
    #[allow(clippy::disallowed_methods)] // awaited below
    let mut worker = tokio::spawn(dstream_executor::worker::run(
        config,
        listener,
        shutdown.clone(),
    ));
    tokio::select! {
        finished = &mut worker => {
            finished.context("worker task")??;
            return Ok(());
        }
        signal = stop_signal() => {
            signal?;
            info!("worker shutting down");
            shutdown.cancel();
        }
    }
    worker.await.context("worker task")??;
    Ok(())
}

/// Ctrl-C or SIGTERM (what `kill`, `docker stop` and Kubernetes send).
async fn stop_signal() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot listen for SIGTERM")?;
    tokio::select! {
        c = tokio::signal::ctrl_c() => c.context("cannot listen for Ctrl-C"),
        _ = term.recv() => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn command_line_is_consistent() {
        Cli::command().debug_assert();
        let cli =
            Cli::try_parse_from(["dstream", "sql", "-h", "db", "-p", "7000", "-c", "SELECT 1"])
                .expect("psql-style flags parse");
        assert!(matches!(cli.command, Command::Sql(_)));
    }
}
