//! dstream benchmarks.
//!
//! `tumble-count`: events per second per core of a 1 s tumbling-window count over
//! `--keys` keys fed by the generator, run by the real engine interval by interval
//! (manual clock, so intervals run back to back), side by side with the same
//! aggregation run as one DataFusion batch query over the same rows, and the ratio.
//! The generator's own cost is measured separately so the stream figure can be read
//! with and without ingest.
//!
//! With `--workers 1,2` the stream side runs once per worker count, each worker a
//! `dstream worker` process with `--worker-cores` task slots, and the throughput of
//! each is reported against the first.
//!
//! `empty-interval`: the coordinator's cost of an interval with no input, with the real
//! clock at 100 ms and at 1 s intervals, read from `dstream_intervals`.
//!
//! Run them in release mode, after building the worker binary:
//! `cargo build --release --bin dstream && cargo run --release -p dstream-bench -- tumble-count`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use arrow::array::RecordBatch;
use clap::{Parser, Subcommand};
use datafusion::catalog::MemTable;
use datafusion::prelude::{SessionConfig, SessionContext};
use dstream_server::Engine;
use dstream_server::clock::ManualClock;
use dstream_server::config::{ClockKind, ServeConfig};
use dstream_server::session::{self, StatementResult};
use tokio_util::sync::CancellationToken;

#[derive(Parser, Debug)]
#[command(about = "dstream benchmarks")]
struct Args {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Subcommand, Debug)]
enum Bench {
    /// 1 s tumbling-window count over many keys: stream vs. DataFusion batch.
    TumbleCount(TumbleCount),
    /// Processing time of empty intervals at 100 ms and 1 s.
    EmptyInterval(EmptyInterval),
}

#[derive(clap::Args, Debug)]
struct EmptyInterval {
    /// Seconds to run each interval width.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Materialized views over the (empty) source.
    #[arg(long, default_value_t = 1)]
    views: usize,
}

#[derive(clap::Args, Debug)]
struct TumbleCount {
    /// Generated events per (simulated) second.
    #[arg(long = "events-per-second", default_value_t = 500_000)]
    rate: u64,
    /// Intervals (seconds of input) to process.
    #[arg(long, default_value_t = 10)]
    intervals: u64,
    /// Distinct keys.
    #[arg(long, default_value_t = 10_000)]
    keys: u64,
    /// State partitions.
    #[arg(long, default_value_t = 4)]
    partitions: usize,
    /// Repetitions; the best of each side is reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Most rows per input block (one map task each).
    #[arg(long, default_value_t = dstream_executor::block::BLOCK_ROWS)]
    block_rows: usize,
    /// Worker counts to run the stream side with, e.g. 1,2.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    workers: Vec<usize>,
    /// Task slots per worker.
    #[arg(long, default_value_t = 1)]
    worker_cores: usize,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match args.bench {
        Bench::TumbleCount(args) => runtime.block_on(tumble_count(args)),
        Bench::EmptyInterval(args) => runtime.block_on(empty_interval(args)),
    }
}

const SOURCE: &str = "CREATE SOURCE events (k BIGINT, ts TIMESTAMP, \
    WATERMARK FOR ts AS ts - INTERVAL '1' SECOND) WITH (connector = 'generator', \
    rows_per_second = {rate}, key_cardinality = {keys}, seed = 1)";
const VIEW: &str = "CREATE MATERIALIZED VIEW counts AS SELECT window_start, k, count(*) AS n \
    FROM TUMBLE(events, ts, INTERVAL '1' SECOND) GROUP BY window_start, k EMIT ON WINDOW CLOSE";
const BATCH: &str = "SELECT date_bin(INTERVAL '1 second', ts) AS window_start, k, count(*) AS n \
    FROM events GROUP BY 1, 2";

struct Engined {
    engine: Engine,
    shutdown: CancellationToken,
    _dir: tempfile::TempDir,
}

impl Engined {
    async fn stop(self) {
        self.shutdown.cancel();
        self.engine.stopped().await;
    }
}

/// The `dstream` binary next to this one (build it with `cargo build --release --bin
/// dstream`).
fn worker_binary() -> anyhow::Result<std::path::PathBuf> {
    let exe = std::env::current_exe()?;
    let bin = exe
        .parent()
        .map(|d| d.join("dstream"))
        .context("no directory for the worker binary")?;
    if !bin.exists() {
        bail!(
            "{} is missing: run `cargo build --release --bin dstream` first",
            bin.display()
        );
    }
    Ok(bin)
}

struct Cluster {
    workers: usize,
    cores: usize,
}

async fn start_engine(
    partitions: usize,
    intervals: u64,
    block_rows: usize,
    cluster: &Cluster,
) -> anyhow::Result<Engined> {
    let dir = tempfile::tempdir()?;
    let config = ServeConfig {
        data_dir: dir.path().join("data"),
        clock: ClockKind::Manual,
        partitions,
        batch_interval: Duration::from_secs(1),
        source_retention: Duration::from_secs(intervals + 2),
        block_rows,
        workers: cluster.workers,
        worker_cores: cluster.cores,
        worker_mode: dstream_server::config::WorkerMode::Process(Some(worker_binary()?)),
        ..ServeConfig::default()
    };
    let shutdown = CancellationToken::new();
    let clock = Arc::new(ManualClock::new(1_767_225_600_000_000_000));
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let engine = Engine::start(config, clock, grpc, shutdown.clone()).await?;
    Ok(Engined {
        engine,
        shutdown,
        _dir: dir,
    })
}

async fn exec(engine: &Engine, sql: &str) -> anyhow::Result<Vec<StatementResult>> {
    session::execute(engine, sql)
        .await
        .with_context(|| format!("executing {sql}"))
}

fn rows(results: &[StatementResult]) -> usize {
    results
        .iter()
        .map(|r| match r {
            StatementResult::Rows { batches, .. } => batches.iter().map(|b| b.num_rows()).sum(),
            _ => 0,
        })
        .sum()
}

fn batches(results: Vec<StatementResult>) -> Vec<RecordBatch> {
    results
        .into_iter()
        .flat_map(|r| match r {
            StatementResult::Rows { batches, .. } => batches,
            _ => vec![],
        })
        .collect()
}

async fn tumble_count(args: TumbleCount) -> anyhow::Result<()> {
    let TumbleCount {
        rate,
        intervals,
        keys,
        partitions,
        runs,
        block_rows,
        workers,
        worker_cores,
    } = args;
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let events = rate * intervals;
    println!(
        "tumble-count: {events} events ({rate}/s for {intervals} intervals of 1s), {keys} keys, P = {partitions}, blocks of {block_rows} rows, {cores} cores, best of {runs}"
    );

    let mut input: Vec<RecordBatch> = Vec::new();
    let mut windows = 0;
    let source = SOURCE
        .replace("{rate}", &rate.to_string())
        .replace("{keys}", &keys.to_string());
    // Both sides seal one interval more than `intervals`: it moves the watermark past
    // the last window.
    let advance = format!("ADVANCE {}", intervals + 1);
    // (workers, best stream time, best generator-alone time)
    let mut measured: Vec<(usize, Duration, Duration)> = Vec::new();
    for &count in &workers {
        let cluster = Cluster {
            workers: count,
            cores: worker_cores,
        };
        let mut best_stream = Duration::MAX;
        let mut best_gen = Duration::MAX;
        for _ in 0..runs {
            // Generator alone: a source with no view, sealed interval by interval.
            let e = start_engine(partitions, intervals, block_rows, &cluster).await?;
            exec(&e.engine, &source).await?;
            let started = Instant::now();
            exec(&e.engine, &advance).await?;
            best_gen = best_gen.min(started.elapsed());
            e.stop().await;

            // The continuous query.
            let e = start_engine(partitions, intervals, block_rows, &cluster).await?;
            exec(&e.engine, &source).await?;
            exec(&e.engine, VIEW).await?;
            let started = Instant::now();
            exec(&e.engine, &advance).await?;
            best_stream = best_stream.min(started.elapsed());
            windows = rows(&exec(&e.engine, "SELECT * FROM counts").await?);
            if input.is_empty() {
                input = batches(exec(&e.engine, "SELECT k, ts FROM events").await?);
            }
            e.stop().await;
        }
        measured.push((count, best_stream, best_gen));
    }
    let input_rows: usize = input.iter().map(|b| b.num_rows()).sum();
    let extra = rate as usize; // the extra interval that closes the last window
    if input_rows != events as usize + extra {
        bail!(
            "expected {} input rows, read back {input_rows}",
            events as usize + extra
        );
    }

    // The batch baseline over the same rows (all intervals, like the stream).
    let ctx = SessionContext::new_with_config(SessionConfig::new().with_target_partitions(cores));
    let schema = input[0].schema();
    let chunks: Vec<Vec<RecordBatch>> = (0..cores)
        .map(|i| input.iter().skip(i).step_by(cores).cloned().collect())
        .collect();
    ctx.register_table("events", Arc::new(MemTable::try_new(schema, chunks)?))?;
    let mut best_batch = Duration::MAX;
    let mut batch_rows = 0;
    for _ in 0..runs {
        let started = Instant::now();
        let out = ctx.sql(BATCH).await?.collect().await?;
        best_batch = best_batch.min(started.elapsed());
        batch_rows = out.iter().map(|b| b.num_rows()).sum();
    }
    if windows == 0 || batch_rows < windows {
        bail!("stream emitted {windows} window rows, batch {batch_rows}: not comparable");
    }

    let total = (events as usize + extra) as f64;
    let per_core = |d: Duration| total / d.as_secs_f64() / cores as f64;
    let per_second = |d: Duration| total / d.as_secs_f64();
    println!("| measure | time | events/s | events/s/core |");
    println!("|---|---|---|---|");
    for (count, best_stream, best_gen) in &measured {
        let stream_only = best_stream.saturating_sub(*best_gen);
        println!(
            "| generator alone, {count} worker(s) | {:.3} s | {:.0} | {:.0} |",
            best_gen.as_secs_f64(),
            per_second(*best_gen),
            per_core(*best_gen)
        );
        println!(
            "| stream, {count} worker(s) | {:.3} s | {:.0} | {:.0} |",
            best_stream.as_secs_f64(),
            per_second(*best_stream),
            per_core(*best_stream)
        );
        println!(
            "| stream minus generator, {count} worker(s) | {:.3} s | {:.0} | {:.0} |",
            stream_only.as_secs_f64(),
            per_second(stream_only),
            per_core(stream_only)
        );
    }
    println!(
        "| DataFusion batch, same rows, {cores} threads | {:.3} s | {:.0} | {:.0} |",
        best_batch.as_secs_f64(),
        per_second(best_batch),
        per_core(best_batch)
    );
    if let Some((first_count, first, _)) = measured.first() {
        for (count, best_stream, _) in measured.iter().skip(1) {
            println!(
                "throughput with {count} workers / with {first_count}: {:.2}x",
                first.as_secs_f64() / best_stream.as_secs_f64()
            );
        }
    }
    if let Some((count, best_stream, best_gen)) = measured.last() {
        let stream_only = best_stream.saturating_sub(*best_gen);
        println!(
            "ratio stream ({count} workers) / batch throughput: {:.2} (incl. generator), {:.2} (minus generator)",
            best_batch.as_secs_f64() / best_stream.as_secs_f64(),
            best_batch.as_secs_f64() / stream_only.as_secs_f64().max(1e-9)
        );
    }
    println!(
        "stream emitted {windows} window rows; batch {batch_rows} (batch includes the still-open last window)"
    );
    Ok(())
}

async fn empty_interval(args: EmptyInterval) -> anyhow::Result<()> {
    println!(
        "empty-interval: one source with no input, {} view(s), real clock, {} s per width, 2 worker processes",
        args.views, args.seconds
    );
    println!("| batch interval | intervals | processing p50 | p99 | max | scheduling delay p50 |");
    println!("|---|---|---|---|---|---|");
    for width_ms in [100u64, 1000] {
        let dir = tempfile::tempdir()?;
        let config = ServeConfig {
            data_dir: dir.path().join("data"),
            clock: ClockKind::Real,
            batch_interval: Duration::from_millis(width_ms),
            workers: 2,
            worker_cores: 1,
            worker_mode: dstream_server::config::WorkerMode::Process(Some(worker_binary()?)),
            ..ServeConfig::default()
        };
        let shutdown = CancellationToken::new();
        let clock = dstream_server::clock_for(&config);
        let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let engine = Engine::start(config, clock, grpc, shutdown.clone()).await?;
        exec(
            &engine,
            "CREATE SOURCE quiet (k BIGINT, v BIGINT) WITH (connector = 'generator', rows_per_second = 0)",
        )
        .await?;
        for i in 0..args.views {
            exec(
                &engine,
                &format!("CREATE MATERIALIZED VIEW v{i} AS SELECT k, count(*) AS n, sum(v) AS s FROM quiet GROUP BY k"),
            )
            .await?;
        }
        let first = engine.committed_intervals();
        tokio::time::sleep(Duration::from_secs(args.seconds)).await;
        let sql = format!(
            "SELECT count(*), \
               approx_percentile_cont(processing_time_ms, 0.5), \
               approx_percentile_cont(processing_time_ms, 0.99), max(processing_time_ms), \
               approx_percentile_cont(scheduling_delay_ms, 0.5) \
             FROM dstream_intervals WHERE interval_id >= {}",
            first + 1
        );
        let out = batches(exec(&engine, &sql).await?);
        let text = arrow::util::pretty::pretty_format_batches(&out)?.to_string();
        let row = text
            .lines()
            .nth(3)
            .unwrap_or_default()
            .trim_matches('|')
            .split('|')
            .map(|c| c.trim().to_string())
            .collect::<Vec<_>>();
        if row.len() == 5 {
            println!(
                "| {width_ms} ms | {} | {} ms | {} ms | {} ms | {} ms |",
                row[0], row[1], row[2], row[3], row[4]
            );
        } else {
            println!("| {width_ms} ms | {text} |");
        }
        shutdown.cancel();
        engine.stopped().await;
    }
    Ok(())
}
